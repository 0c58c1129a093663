"""What Flower's own DP mechanisms guarantee, and against whom (``flower_dp.mode``; the mechanisms run in
:mod:`fed_ser.flower.privacy`, as Flower ships them; this module only accounts for them).

* **Central DP** (``central-fixed``, ``central-adaptive``, ``client-fixed``): the round's mean of ``m``
  clipped updates gets ``N(0, (sigma C / m)^2)``. Against an observer of the global models, each
  round a client takes part in is a Gaussian mechanism whose sensitivity to replacing the client's
  data is ``2C / m``: noise multiplier ``sigma / 2``, composed over the client's participations (RDP,
  no amplification by client sampling, as for ``dp=user``). Against the **server** there is no
  guarantee: it receives every update before the noise (and, with server-side clipping, before
  the clipping). ``central-adaptive`` splits ``sigma`` between the update and the clipped-count
  release (Andrew et al. 2021), so the pair is accounted with the ``sigma`` given.
* **Local DP** (``local``, ``LocalDpMod``): each update is clipped to ``C`` and noised with
  ``N(0, (2C z)^2)``, ``z = sqrt(2 ln(1.25 / delta)) / epsilon``, before it leaves the client. Against
  the server (and anyone else) each participation is a Gaussian mechanism of noise multiplier
  ``z``: composed over the client's participations. The per-release (epsilon, delta) of the
  classical analysis holds for epsilon <= 1 only; the RDP account holds for every epsilon.
"""

from __future__ import annotations

import math

from defenses.privacy.accounting import spent

CENTRAL_MODES = ("central-fixed", "central-adaptive", "client-fixed")

GUARANTEES = {
    "central-fixed": "user-level, against observers of the global models only (Gaussian, replace-one sensitivity 2C/m, "
                     "over the client's participations); none against the server, which receives every update unclipped",
    "central-adaptive": "as central-fixed, with the clipping norm adapted to the updates' median norm; none against the "
                        "server, which receives every update unclipped",
    "client-fixed": "user-level, against observers of the global models only; none against the server, which receives "
                    "each clipped update without noise",
    "local": "user-level, against the server and every other observer: each update is clipped and noised on the client "
             "(Gaussian, sensitivity 2C, RDP over the client's participations)",
}


def central_epsilon(noise_multiplier: float, participations: int, delta: float) -> float:
    """Epsilon of central DP against an observer of the global models after ``participations`` rounds."""
    return spent(noise_multiplier / 2.0, 1.0, participations, delta)


def local_noise_multiplier(epsilon: float, delta: float) -> float:
    """``LocalDpMod``'s noise std over its sensitivity: ``sqrt(2 ln(1.25 / delta)) / epsilon``."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def local_epsilon(epsilon: float, delta: float, participations: int) -> float:
    """Epsilon of local DP against the server after ``participations`` releases of ``LocalDpMod(epsilon, delta)``."""
    return spent(local_noise_multiplier(epsilon, delta), 1.0, participations, delta)


def flower_dp_report(mode: str, noise_multiplier: float, epsilon: float, delta: float, took_part: list[int],
                     secagg: bool = False) -> dict:
    """What each client spent under Flower's ``mode`` (``took_part[client]``: rounds it replied in), and against whom.

    ``epsilon_server`` is None where the server receives the update before any noise (no guarantee); under
    SecAgg+ (``secagg``) a central mode's server still adds the noise after it unmasks the sum.
    """
    if mode in CENTRAL_MODES:
        per_client = [central_epsilon(noise_multiplier, c, delta) for c in took_part]
        server = None
    elif mode == "local":
        per_client = [local_epsilon(epsilon, delta, c) for c in took_part]
        server = max(per_client)
    else:
        raise ValueError(f"flower_dp.mode: no privacy report for {mode!r}")
    guarantee = GUARANTEES[mode]
    if secagg and mode in CENTRAL_MODES:
        guarantee = ("user-level, against observers of the global models only; none against the server, which under "
                     "SecAgg+ unmasks the round's sum of clipped updates before it adds the noise")
    elif secagg:
        guarantee += "; SecAgg+: the server sees only the round's sum of noised updates"
    return {"mode": f"flower:{mode}", "guarantee": guarantee, "delta": delta,
            "noise_multiplier": noise_multiplier if mode in CENTRAL_MODES else local_noise_multiplier(epsilon, delta),
            "epsilon_aggregate_observer": max(per_client), "epsilon_server": server,
            "spent_epsilon_max": max(per_client), "spent_epsilon_mean": sum(per_client) / len(per_client),
            "clients": [{"steps": int(c), "epsilon": e} for c, e in zip(took_part, per_client)]}
