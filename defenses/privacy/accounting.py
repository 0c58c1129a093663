"""Privacy accounting for the Gaussian mechanisms here: Opacus' RDP accountant, calibrated per client, and the
exact account of an unsubsampled Gaussian mechanism.

Pure functions of (noise multiplier, sample rate, steps, delta): the DP mechanisms in
:mod:`defenses.privacy.dp_fedsgd` and :mod:`defenses.privacy.user_dp` say what their steps are, this module says what
they spend (and the noise multiplier that spends a target).

RDP (Mironov 2017) is what the mechanisms calibrate with; it is an upper bound, loose by about 10% for one
Gaussian release. Where nothing is subsampled (``sample_rate = 1``: user-level DP against the server,
Flower's central and local DP), ``steps`` releases of a Gaussian mechanism of noise multiplier ``z`` are
exactly ``mu``-GDP with ``mu = sqrt(steps) / z`` (Dong, Roth & Su 2019), and the exact ``(epsilon, delta)``
curve of that is the analytic Gaussian mechanism's (Balle & Wang 2018)::

    delta(epsilon) = Phi(-epsilon / mu + mu / 2) - e^epsilon Phi(-epsilon / mu - mu / 2)

:func:`gaussian_epsilon` inverts it: the tightest claim there is for those mechanisms, and what the
empirical audit (:mod:`defenses.privacy.audit`) is measured against.
"""

from __future__ import annotations

import math
from functools import lru_cache

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.optimize import brentq
from scipy.special import log_ndtr


@lru_cache(maxsize=4096)
def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier for which ``steps`` steps at ``sample_rate`` spend ``epsilon``."""
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=max(int(steps), 1), accountant="rdp"))


def spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon spent by ``steps`` steps of the subsampled Gaussian mechanism (RDP, Opacus)."""
    if steps == 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, int(steps))]
    return float(acc.get_epsilon(delta))


def gaussian_mu(noise_multiplier: float, steps: int) -> float:
    """``mu`` of ``steps`` releases of a Gaussian mechanism with noise std ``noise_multiplier`` x sensitivity."""
    return math.sqrt(max(int(steps), 0)) / noise_multiplier


def gaussian_delta(mu: float, epsilon: float) -> float:
    """The exact delta at ``epsilon`` of a ``mu``-GDP mechanism (Balle & Wang 2018; Dong, Roth & Su 2019)."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + log_ndtr(-epsilon / mu - mu / 2)
    return max(math.exp(a) - math.exp(b), 0.0)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of a ``mu``-GDP mechanism: the root of :func:`gaussian_delta` (0 if none is needed).

    Increasing in ``mu``, so a lower confidence bound on ``mu`` gives one on epsilon (:mod:`defenses.privacy.audit`).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta: must be in (0, 1), got {delta}")
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-10, rtol=1e-12))


def exact_spent(noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon spent by ``steps`` unsubsampled Gaussian releases, exactly (:func:`gaussian_epsilon`); ``spent``
    with ``sample_rate=1`` is its RDP upper bound."""
    if steps == 0:
        return 0.0
    return gaussian_epsilon(gaussian_mu(noise_multiplier, steps), delta)


def tightest_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon from the tightest accountant that fits: exact (:func:`exact_spent`) without subsampling, else
    Opacus' PRV accountant (Gopi, Lee & Wutschitz 2021; numerically within its error of the truth)."""
    if sample_rate >= 1.0:
        return exact_spent(noise_multiplier, steps, delta)
    if steps == 0:
        return 0.0
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, int(steps))]
    return float(acc.get_epsilon(delta))
