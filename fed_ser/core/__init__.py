"""The federated core, below everything else: the SER model, one description of a client's local
work, the seeded client schedule, server aggregation, UAR, and the flat run settings."""
