"""User-level DP for FedAvg: each client clips its whole update and adds Gaussian noise before sending.

Gender is a property of the client, so the guarantee that matters is over the client's whole data
(user level), not one of its utterances. A client ``k`` that takes part in a round sends

    theta + clip_C(theta_k - theta) + N(0, (sigma C)^2 I)

What this guarantees, and against whom (both are reported):

* **against the server**, which sees every update and chose who takes part: each participation is
  a Gaussian mechanism on the client's data whose clipped update, for any two data sets of the
  client, differs by at most ``2C`` (replace-one-user sensitivity): noise multiplier ``sigma / 2``,
  composed over the client's own participations, with no amplification by client sampling (the
  server knows it). ``dp.epsilon`` is met here: each client calibrates ``sigma`` to the rounds the
  shared schedule selects it for.
* **against an observer of the aggregates** (the global models only), with clients sampled at rate
  ``q`` a round: the sum of the round's noises, std ``sigma C sqrt(K)`` for ``K`` clients, against
  sensitivity ``C``, amplified by ``q``, over every round (the standard DP-FedAvg account; valid when
  the sampling is secret from that observer).

``delta`` must stay well below 1 / (number of clients): a delta of 1/N allows one client's data to
be published outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from defenses.privacy import check_privacy_parameters
from defenses.privacy.accounting import calibrate, spent


@dataclass(frozen=True)
class UserDPConfig:
    """User-level DP: target ``epsilon`` at ``delta`` against the server, update clipping norm ``clip``."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0

    def __post_init__(self) -> None:
        check_privacy_parameters(self.epsilon, self.delta, self.clip)


def check_delta(delta: float, num_clients: int) -> None:
    """User-level delta must be well below 1/N (the key is named in the message)."""
    if not delta < 0.1 / num_clients:
        raise ValueError(f"dp.delta: {delta} is not well below 1/{num_clients} clients (use < {0.1 / num_clients:.1e}); "
                         "a delta of 1/N allows one client's data to be released")


def server_noise_multiplier(cfg: UserDPConfig, participations: int) -> float:
    """``sigma`` for which the client's ``participations`` spend ``cfg.epsilon`` against the server."""
    return 2.0 * calibrate(cfg.epsilon, cfg.delta, 1.0, max(participations, 1))


def server_epsilon(sigma: float, participations: int, delta: float) -> float:
    """Epsilon against the server after ``participations`` rounds (sensitivity 2C, no amplification)."""
    return spent(sigma / 2.0, 1.0, participations, delta)


def aggregate_epsilon(sigma: float, clients_per_round: int, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon against an observer of the global models: the round's summed noise (std
    ``sigma C sqrt(K)``) against sensitivity ``C``, client sampling at ``sample_rate``, ``rounds`` steps."""
    return spent(sigma * math.sqrt(clients_per_round), sample_rate, rounds, delta)


def privatize(new: dict[str, np.ndarray], old: dict[str, np.ndarray], clip: float, sigma: float,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Parameters the client sends: ``old + clip(new - old) + N(0, (sigma clip)^2)``."""
    delta = {k: new[k].astype(np.float64) - old[k] for k in new}
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (old[k] + d * scale + rng.normal(0.0, sigma * clip, size=d.shape)).astype(np.float32)
            for k, d in delta.items()}
