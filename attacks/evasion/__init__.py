"""Adversarial examples against the SER model (FGSM, PGD): evasion, not inference."""
