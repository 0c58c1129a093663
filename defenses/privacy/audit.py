"""Empirical privacy auditing: a lower bound on epsilon measured from a mechanism's outputs.

The canary audit (Jagielski et al. 2020; Nasr et al. 2021): run the mechanism many times on two
neighbouring inputs, one with the canary (a client whose clipped update points one way) and one
without (it points the other way), score each output by how far it points at the canary, and read
a threshold test. Any (epsilon, delta)-DP mechanism keeps every such test within
``FPR + e^epsilon FNR >= 1 - delta`` (and the same with the roles swapped), so
``epsilon >= log((1 - delta - FNR) / FPR)``. With Clopper-Pearson bounds on the two rates at
confidence ``1 - alpha`` the bound holds with that confidence; the threshold is chosen on one half
of the runs and the rates are counted on the other, so choosing it does not inflate the bound.
A mechanism with a proven epsilon must audit at or below it; a mechanism without noise audits at
the most ``n`` runs can show (about ``log(n / 6)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import beta

DIM = 16  # the audited update's size: the canary direction is its first coordinate


def canary_update(canary: bool, clip: float) -> np.ndarray:
    """The canary client's update: ten times the clip along e_1, or against it (clipped: +-C e_1)."""
    u = np.zeros(DIM)
    u[0] = (10.0 if canary else -10.0) * clip
    return u


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided upper confidence bound on a rate seen ``k`` times in ``n`` trials."""
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def _bound(fpr: float, fnr: float, delta: float) -> float:
    if fpr <= 0:
        return math.inf
    return math.log(max(1 - delta - fnr, 1e-300) / fpr)


def epsilon_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, delta: float, alpha: float = 0.05,
                        seed: int = 0) -> dict:
    """The audited epsilon from scores of outputs with (``scores_in``) and without the canary.

    Returns the bound (0 when no test beats chance), the threshold and the rates it rests on.
    """
    rng = np.random.default_rng(seed)
    a, b = rng.permutation(np.asarray(scores_in, float)), rng.permutation(np.asarray(scores_out, float))
    a1, a2, b1, b2 = a[: len(a) // 2], a[len(a) // 2:], b[: len(b) // 2], b[len(b) // 2:]
    best = (-math.inf, 0.0, 1)
    for t in np.unique(np.concatenate([a1, b1])):
        for sign in (1, -1):  # "canary" when sign * score >= sign * t
            fpr = float(np.mean(sign * b1 >= sign * t)) + 0.5 / len(b1)
            fnr = float(np.mean(sign * a1 < sign * t))
            est = _bound(fpr, fnr, delta)
            if est > best[0]:
                best = (est, float(t), sign)
    _, t, sign = best
    fp, fn = int(np.sum(sign * b2 >= sign * t)), int(np.sum(sign * a2 < sign * t))
    fpr_ub = clopper_pearson_upper(fp, len(b2), alpha / 2)
    fnr_ub = clopper_pearson_upper(fn, len(a2), alpha / 2)
    eps = max(_bound(fpr_ub, fnr_ub, delta), 0.0)
    return {"epsilon_lower_bound": eps, "threshold": t, "direction": sign, "false_positives": fp, "false_negatives": fn,
            "runs_per_side": len(a2), "confidence": 1 - alpha, "most_measurable": _bound(clopper_pearson_upper(0, len(b2), alpha / 2), 0.0, delta)}


def audit(mechanism: Callable[[bool, np.random.Generator], float], trials: int, delta: float, seed: int = 0,
          alpha: float = 0.05) -> dict:
    """Audit ``mechanism(canary, rng) -> score`` over ``trials`` runs on each input."""
    if trials < 20:
        raise ValueError(f"audit.trials: {trials} runs cannot bound anything; use >= 20")
    rng = np.random.default_rng(seed)
    scores_in = np.array([mechanism(True, rng) for _ in range(trials)])
    scores_out = np.array([mechanism(False, rng) for _ in range(trials)])
    return epsilon_lower_bound(scores_in, scores_out, delta, alpha, seed)
