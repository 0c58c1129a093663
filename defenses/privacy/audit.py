"""Empirical privacy auditing: lower bounds on epsilon measured from a mechanism's outputs.

The canary audit (Jagielski et al. 2020; Nasr et al. 2021): run the mechanism many times on two
neighbouring inputs, one with the canary (a client whose clipped update points one way) and one
without (it points the other way), and score each output by how far it points at the canary.
Three bounds read those scores, each at confidence ``1 - alpha``:

* **Clopper-Pearson** (:func:`epsilon_lower_bound`, no assumption): any (epsilon, delta)-DP mechanism
  keeps every threshold test within ``FPR + e^epsilon FNR >= 1 - delta`` (and with the roles swapped), so
  ``epsilon >= log((1 - delta - FNR) / FPR)``, with Clopper-Pearson bounds on the two rates. The threshold
  and its direction are chosen on one half of the runs, the rates counted on the other. It cannot show
  more than about ``log(n / 6)`` with ``n`` runs a side, whatever the mechanism spends.
* **Gaussian DP fit** (:func:`gdp_lower_bound`; Nasr et al. 2023, "Tight auditing of differentially
  private machine learning"): *assuming the scores are Gaussian with one variance on both inputs*
  (true for a Gaussian mechanism scored linearly: ``N(m_in, s^2)`` against ``N(m_out, s^2)``), the pair
  of score distributions is exactly ``mu``-GDP with ``mu = |m_in - m_out| / s``, and the mechanism, whose
  post-processing they are, spends at least ``epsilon(mu, delta)`` (:func:`defenses.privacy.accounting.gaussian_epsilon`).
  A one-sided lower confidence bound on ``mu`` (the noncentral-t bound on a standardised mean
  difference, exact under the assumption) gives one on epsilon. It uses every run and is tight near
  the truth; the assumption is checked (normality and equal-variance p-values are reported), and the
  Clopper-Pearson bound, which needs none, stays beside it.
* **One run** (:func:`one_run_epsilon`; Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1)
  training run"): ``m`` canaries in one run, each one's side drawn with probability 1/2; the auditor
  guesses the side of the ``r`` canaries scored most extreme and abstains on the rest. With ``v`` of the
  ``r`` guesses right, (epsilon, delta)-DP with respect to each canary is rejected at level ``alpha``
  when :func:`one_run_p_value` is below it. No assumption on the scores.

A mechanism with a proven epsilon must audit at or below it (with probability ``1 - alpha``); one that
spends more (too little noise, a forgotten clip) audits above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import beta, binom, levene, nct, normaltest

from defenses.privacy.accounting import gaussian_epsilon

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
    """The Clopper-Pearson audited epsilon from scores of outputs with (``scores_in``) and without the canary.

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


def _mu_lower(t: float, df: int, scale: float, alpha: float) -> float:
    """The one-sided ``1 - alpha`` lower confidence bound on ``mu`` from ``t = d / scale`` ~ noncentral t(df, mu / scale)."""
    if nct.sf(t, df, 0.0) >= alpha:  # not significant even at mu = 0
        return 0.0
    hi = max(2.0 * t, 1.0)
    while nct.sf(t, df, hi) < alpha:
        hi *= 2
    return float(brentq(lambda nc: nct.sf(t, df, nc) - alpha, 0.0, hi, xtol=1e-10)) * scale


def gdp_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, delta: float, alpha: float = 0.05) -> dict:
    """A lower confidence bound on epsilon at ``delta``, *assuming Gaussian scores of equal variance* (see the module).

    With ``d`` the standardised mean difference (pooled variance), ``d / sqrt(1/n_in + 1/n_out)`` is
    noncentral t with ``n_in + n_out - 2`` degrees of freedom and noncentrality ``mu / sqrt(1/n_in + 1/n_out)``:
    inverting its tail gives an exact one-sided lower bound on ``mu`` for each direction of the shift.
    The direction is not chosen from the data: both one-sided bounds are taken at ``alpha / 2`` and the
    larger kept (Bonferroni), so the choice cannot inflate the bound. ``gdp_epsilon_lower_bound`` is None
    where the scores do not vary (no noise: the Gaussian assumption fails; read the Clopper-Pearson bound)
    or a side has fewer than two scores.
    The two p-values test the assumption (D'Agostino-Pearson normality of the centred scores; Levene's equal variance).
    """
    a, b = np.asarray(scores_in, float), np.asarray(scores_out, float)
    n1, n0 = len(a), len(b)
    df = n1 + n0 - 2
    out = {"gdp_epsilon_lower_bound": None, "mu_hat": None, "mu_lower": None, "gdp_normality_p": None,
           "gdp_equal_variance_p": None, "gdp_runs_per_side": min(n1, n0)}
    if n1 < 2 or n0 < 2:  # no variance to estimate (a one-run audit whose sides came out nearly all one way)
        return out
    pooled = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n0 - 1) * b.var(ddof=1)) / df)
    if not pooled > 1e-12 * max(1.0, float(np.abs(np.concatenate([a, b])).max())):
        return out
    scale = math.sqrt(1 / n1 + 1 / n0)
    d = (a.mean() - b.mean()) / pooled
    lo = max(_mu_lower(d / scale, df, scale, alpha / 2), _mu_lower(-d / scale, df, scale, alpha / 2))
    centred = np.concatenate([a - a.mean(), b - b.mean()]) / pooled
    out.update(gdp_epsilon_lower_bound=gaussian_epsilon(lo, delta), mu_hat=abs(float(d)), mu_lower=lo,
               gdp_normality_p=float(normaltest(centred).pvalue) if len(centred) >= 20 else None,
               gdp_equal_variance_p=float(levene(a, b, center="mean").pvalue))
    return out


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """How likely ``v`` or more of ``r`` guesses about ``m`` canaries are right, were the run (epsilon, delta)-DP
    with respect to each canary (Steinke, Nasr & Jagielski 2023, their Theorem 5.2):
    ``P[W >= v] + 2 m delta max_i P[v - i <= W < v] / i`` with ``W ~ Binomial(r, e^eps / (1 + e^eps))``."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"one_run_p_value: need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    q = float(expit(epsilon))
    p = float(binom.sf(v - 1, r, q))
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        mass = binom.cdf(v - 1, r, q) - binom.cdf(v - 1 - i, r, q)
        p += 2 * m * delta * float(np.max(mass / i))
    return min(p, 1.0)


def _one_run_bound(m: int, r: int, v: int, delta: float, alpha: float, step: float = 0.05) -> float:
    """The largest epsilon below which every (epsilon, delta) is rejected at level ``alpha`` (the first crossing)."""
    if one_run_p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    e = 0.0
    while one_run_p_value(m, r, v, e + step, delta) <= alpha:
        e += step
        if e > 200:
            return math.inf
    return float(brentq(lambda x: one_run_p_value(m, r, v, x, delta) - alpha, e, e + step, xtol=1e-6))


def one_run_epsilon(scores: np.ndarray, sides: np.ndarray, delta: float, alpha: float = 0.05,
                    guess_fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)) -> dict:
    """The one-run audit's lower bound from each canary's score and its side (``sides``: +1 in, -1 out).

    For each fraction ``g`` (fixed before the scores are seen) the auditor guesses "in" for the
    ``g m / 2`` highest scores and "out" for the ``g m / 2`` lowest; the bound is the best over the
    fractions, each taken at ``alpha / len(guess_fractions)`` (Bonferroni), so choosing it does not inflate it.
    """
    scores, sides = np.asarray(scores, float), np.asarray(sides)
    m = len(scores)
    if m < 2 or len(sides) != m or not np.isin(sides, (-1, 1)).all():
        raise ValueError("one_run_epsilon: one side (+1 or -1) per canary score, at least two canaries")
    order = np.argsort(scores, kind="stable")
    level = alpha / len(guess_fractions)
    best = {"one_run_epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    most = 0.0
    for g in guess_fractions:
        half = min(max(int(round(g * m / 2)), 1), m // 2)
        v = int(np.sum(sides[order[-half:]] == 1) + np.sum(sides[order[:half]] == -1))
        eps = _one_run_bound(m, 2 * half, v, delta, level)
        most = max(most, _one_run_bound(m, 2 * half, 2 * half, delta, level))
        if eps > best["one_run_epsilon_lower_bound"] or best["guesses"] == 0:
            best = {"one_run_epsilon_lower_bound": eps, "guesses": 2 * half, "correct": v}
    return {**best, "canaries": m, "confidence": 1 - alpha, "most_measurable": most}


def audit(mechanism: Callable[[bool, np.random.Generator], float], trials: int, delta: float, seed: int = 0,
          alpha: float = 0.05) -> dict:
    """Audit ``mechanism(canary, rng) -> score`` over ``trials`` runs on each input: the Clopper-Pearson bound
    (:func:`epsilon_lower_bound`) and the Gaussian-DP fit (:func:`gdp_lower_bound`) of the same scores."""
    if trials < 20:
        raise ValueError(f"audit.trials: {trials} runs cannot bound anything; use >= 20")
    rng = np.random.default_rng(seed)
    scores_in = np.array([mechanism(True, rng) for _ in range(trials)])
    scores_out = np.array([mechanism(False, rng) for _ in range(trials)])
    return {**epsilon_lower_bound(scores_in, scores_out, delta, alpha, seed), **gdp_lower_bound(scores_in, scores_out, delta, alpha)}
