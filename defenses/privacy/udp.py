"""UDP as published (``dp.mode=udp``): the defence of the paper's code, *not a formal guarantee*.

Following UDP (Wei et al. 2021) as used by the paper's code: the client's update
``delta = theta_k - theta`` is clipped to L2 norm ``clip``; Gaussian noise with

    sigma = (2 * clip / m) * sqrt(2 * q * T * ln(1 / delta_dp)) / epsilon

is added to every parameter (``m``: the client's sample count, ``q``: the fraction of clients a
round, ``T``: rounds). The client then sends ``theta + clipped delta + noise``. Why its epsilon
guarantees nothing about a client: the update is clipped as a whole (user level) but the noise is
scaled to a per-record sensitivity ``2C / m``, and the published ``delta = 0.5`` allows anything.
Kept to reproduce the paper's defence; every report labels it "as published, not a formal
guarantee". For a guarantee, use user-level DP (:mod:`defenses.privacy.user_dp`, ``dp.mode=user``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from defenses.privacy import check_privacy_parameters


@dataclass(frozen=True)
class UDPConfig:
    epsilon: float
    delta: float = 0.5  # the paper's code used 0.5
    clip: float = 0.25

    def __post_init__(self) -> None:
        check_privacy_parameters(self.epsilon, self.delta, self.clip)


def udp_sigma(cfg: UDPConfig, num_examples: int, fraction: float, rounds: int) -> float:
    """Noise standard deviation per parameter for a client with ``num_examples`` rows."""
    return (2 * cfg.clip / num_examples) * math.sqrt(2 * fraction * rounds * math.log(1 / cfg.delta)) / cfg.epsilon


def clip_update(new: dict[str, np.ndarray], old: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """``new - old`` scaled so that its L2 norm over all layers is at most ``clip``."""
    delta = {k: new[k].astype(np.float64) - old[k] for k in new}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in delta.items()}


def privatize_update(new: dict[str, np.ndarray], old: dict[str, np.ndarray], cfg: UDPConfig, sigma: float,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Parameters a UDP client sends: ``old + clip(new - old) + N(0, sigma^2)``."""
    clipped = clip_update(new, old, cfg.clip)
    return {k: (old[k] + clipped[k] + rng.normal(0.0, sigma, size=clipped[k].shape)).astype(np.float32)
            for k in new}
