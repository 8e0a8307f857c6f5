"""ServerApp: strategies, stage state machine, outputs."""
