"""ClientApp shared by every strategy."""
