"""Defences against attribute inference and adversarial examples (no Flower imports).

- :mod:`defenses.dp`: DP-FedSGD with Opacus (per-sample clipping, Gaussian noise, RDP accounting).
- :mod:`defenses.udp`: user-level DP for FedAvg (clip the whole update, add Gaussian noise).
Dropout is a model setting (``model.dropout``).
"""


def check_privacy_parameters(epsilon: float, delta: float, clip: float) -> None:
    """Reject settings no DP mechanism here can honour; the message names the config key."""
    if not epsilon > 0:
        raise ValueError(f"dp.epsilon: must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"dp.delta: must be in (0, 1), got {delta}")
    if not clip > 0:
        raise ValueError(f"dp.clip: must be > 0, got {clip}")
