"""DP-FedSGD and user-level DP in a run: what each client's noise is calibrated for, what it spent.

The schedule fixes before training which rounds select each client, so a client can calibrate its
noise to its own participations (:func:`dp_steps`); after the run, :func:`privacy_report` computes
what each client spent from the rounds it actually replied in, and says what that epsilon
guarantees and for whom (:data:`GUARANTEES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from defenses.privacy.dp_fedsgd import noise_multiplier, planned_steps, spent_epsilon
from defenses.privacy.udp import udp_sigma
from defenses.privacy.user_dp import aggregate_epsilon, check_delta, server_epsilon, server_noise_multiplier
from fed_ser.core.schedule import clients_per_round, participations
from fed_ser.core.training import sample_rate
from fed_ser.run.settings import ConfigError

if TYPE_CHECKING:
    from fed_ser.run.settings import RunSettings


def dp_steps(s: RunSettings, client: int, num_clients: int) -> int:
    """The participations client ``client``'s DP noise is calibrated for (``dp.calibrate``).

    ``per_client``: the rounds the shared schedule selects it for, so that no client spends more
    than ``dp.epsilon`` (a client never selected gets 1). ``expected``: ``rounds * fraction`` for
    every client, as a paper would plan it; clients selected more often spend more than the target.
    """
    if s.dp_calibrate == "expected":
        return planned_steps(s.rounds, s.fraction)
    return max(participations(s.seed, s.rounds, num_clients, s.fraction)[client], 1)


def check_privacy(s: RunSettings, num_clients: int) -> None:
    """Checks that need the federation's size: user-level delta well below 1/N (:class:`ConfigError`)."""
    if s.dp_mode == "user":
        try:
            check_delta(s.dp_delta, num_clients)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


#: What each DP mode's reported epsilon guarantees, and for whom (in every report).
GUARANTEES = {
    "sample": "sample-level (one utterance of a client), against anyone who sees the client's updates "
              "(the server included): RDP of the Poisson-subsampled Gaussian mechanism over the client's participations",
    "user": "user-level (all of a client's data), against the server that sees each update: Gaussian mechanism "
            "with replace-one sensitivity 2C over the client's participations, no amplification by client sampling",
    "udp": "as published, not a formal guarantee (per-record sensitivity 2C/m for a user-level clip; "
           "the paper's delta 0.5 allows anything)",
}


def privacy_report(s: RunSettings, num_examples: list[int], took_part: list[int]) -> dict | None:
    """Privacy spent by each client (``num_examples[client]`` rows, ``took_part[client]`` rounds it replied in).

    The noise was calibrated to the scheduled participations; what is spent is computed from the
    participations that happened. Each mode says what its epsilon guarantees (:data:`GUARANTEES`).
    """
    if s.flower_dp_mode != "none":
        from defenses.privacy.central import flower_dp_report

        return flower_dp_report(s.flower_dp_mode, s.flower_dp_noise, s.flower_dp_epsilon, s.flower_dp_delta, took_part,
                                s.secagg)
    if s.dp_mode == "none":
        return None
    if len(took_part) != len(num_examples):
        raise ValueError("privacy_report: one participation count per client is required")
    report = {"mode": s.dp_mode, "guarantee": GUARANTEES[s.dp_mode], "target_epsilon": s.dp_epsilon,
              "delta": s.dp_delta, "clip": s.dp_clip}
    cfg, clients, n = s.privacy(), [], len(num_examples)
    if s.dp_mode == "sample":
        for client, (m, c) in enumerate(zip(num_examples, took_part)):
            q, calibrated = sample_rate(s.batch_size, m), dp_steps(s, client, n)
            sigma = noise_multiplier(cfg, q, calibrated)
            clients.append({"num_examples": int(m), "sample_rate": q, "noise_multiplier": sigma, "steps": int(c),
                            "calibrated_steps": calibrated, "epsilon": spent_epsilon(sigma, q, int(c), s.dp_delta)})
        report.update(calibrate=s.dp_calibrate, planned_steps=planned_steps(s.rounds, s.fraction))
    elif s.dp_mode == "user":
        for client, (m, c) in enumerate(zip(num_examples, took_part)):
            calibrated = dp_steps(s, client, n)
            sigma = server_noise_multiplier(cfg, calibrated)
            clients.append({"num_examples": int(m), "noise_multiplier": sigma, "steps": int(c),
                            "calibrated_steps": calibrated, "epsilon": server_epsilon(sigma, int(c), s.dp_delta)})
        k = clients_per_round(n, s.fraction)
        report.update(calibrate=s.dp_calibrate, aggregate_observer_epsilon=aggregate_epsilon(
            min(c["noise_multiplier"] for c in clients), k, k / n, s.rounds, s.dp_delta))
    else:
        clients = [{"num_examples": int(m), "sigma": udp_sigma(cfg, int(m), s.fraction, s.rounds), "steps": int(c),
                    "epsilon": s.dp_epsilon} for m, c in zip(num_examples, took_part)]
    eps = [c["epsilon"] for c in clients]
    report.update(spent_epsilon_max=max(eps), spent_epsilon_mean=float(np.mean(eps)), clients=clients)
    return report
