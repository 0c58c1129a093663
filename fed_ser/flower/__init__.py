"""Everything Flower: the ServerApp, the ClientApp, the strategy with its eavesdropping hook, and
the simulation launcher. The only package that imports ``flwr``."""
