"""Defences against attribute inference and adversarial examples (no Flower imports).

- :mod:`defenses.dp`: DP-FedSGD with Opacus (per-sample clipping, Gaussian noise, RDP accounting).
- :mod:`defenses.udp`: user-level DP for FedAvg (clip the whole update, add Gaussian noise).
Dropout is a model setting (``model.dropout``).
"""
