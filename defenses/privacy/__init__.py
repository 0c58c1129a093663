"""Differential privacy for federated SER: mechanisms, accounting, and what Flower's DP guarantees to whom
(what each client of a run spent is reported by :mod:`fed_ser.run.privacy`)."""


def check_privacy_parameters(epsilon: float, delta: float, clip: float) -> None:
    """Reject settings no DP mechanism here can honour; the message names the config key."""
    if not epsilon > 0:
        raise ValueError(f"dp.epsilon: must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"dp.delta: must be in (0, 1), got {delta}")
    if not clip > 0:
        raise ValueError(f"dp.clip: must be > 0, got {clip}")
