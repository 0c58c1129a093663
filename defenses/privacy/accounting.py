"""Privacy accounting for the Gaussian mechanisms here: Opacus' RDP accountant, calibrated per client.

Pure functions of (noise multiplier, sample rate, steps, delta): the DP mechanisms in
:mod:`defenses.privacy.dp_fedsgd` and :mod:`defenses.privacy.user_dp` say what their steps are, this module says what
they spend (and the noise multiplier that spends a target).
"""

from __future__ import annotations

from functools import lru_cache

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier


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
