"""Defences against adversarial examples: federated adversarial training, test-time randomisation."""
