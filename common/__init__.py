"""Memory-efficient federated learning through progressive training: shared layer."""
