"""Speaker-level statistics: intervals as wide as the evidence behind them.

Attacked clients are not independent draws. Several clients share one speaker (IEMOCAP and
MSP-Improv speakers are cut into shards, EmoDB's into 4), and under ``shadow.mode=speakers`` one
speaker is attacked in several folds. An interval that resamples clients counts such a speaker
many times and is too narrow. Every interval here is a **cluster bootstrap over speakers**: a
speaker's clients are resampled together (Davison & Hinkley, *Bootstrap Methods and their
Application*, 1997, sec. 3.8; Field & Welsh, JRSS-B 2007). Statistics that need both genders
(balanced accuracy, AUC) resample speakers within each gender, so every resample has both. Where
every speaker agrees (all right or all wrong) the bootstrap collapses to a point; the interval is
then the exact binomial one (Clopper-Pearson) over the number of speakers.

The permutation test of the controls lives here too: a p-value from a null distribution of
statistics computed under labellings that exclude the identity and its inverse
(:func:`speaker_labellings`), so that a control cannot pass by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate, its interval at ``level`` and how the interval was obtained."""

    point: float
    low: float
    high: float
    method: str  # "speaker bootstrap", "Clopper-Pearson over speakers (all agree)", or "n/a: <why>"

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact two-sided binomial interval of a proportion seen ``k`` times in ``n`` trials."""
    from scipy.stats import binomtest

    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def cluster_resamples(clusters: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                      strata: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` resamples: whole clusters drawn with replacement (within each
    stratum when ``strata`` is given: a cluster must lie in one stratum)."""
    clusters = np.asarray(clusters)
    names, inverse = np.unique(clusters, return_inverse=True)
    rows = [np.flatnonzero(inverse == i) for i in range(len(names))]
    if strata is None:
        groups = [np.arange(len(names))]
    else:
        strata = np.asarray(strata)
        first = np.array([strata[r[0]] for r in rows])
        if any(len(np.unique(strata[r])) > 1 for r in rows):
            raise ValueError("a cluster (speaker) spans two strata (genders)")
        groups = [np.flatnonzero(first == s) for s in np.unique(first)]
    rng = np.random.default_rng([seed, 4099])
    for _ in range(n_boot):
        picked = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        yield np.concatenate([rows[i] for i in picked])


def _all_agree(values: np.ndarray, clusters: np.ndarray) -> bool | None:
    """True if every cluster's mean is 1, False if every one is 0, None otherwise."""
    means = np.array([values[clusters == c].mean() for c in np.unique(clusters)])
    if np.all(means == 1.0):
        return True
    if np.all(means == 0.0):
        return False
    return None


def cluster_interval(values: np.ndarray, clusters: np.ndarray, statistic: Callable[[np.ndarray], float],
                     *, strata: np.ndarray | None = None, n_boot: int = N_BOOT, level: float = LEVEL,
                     seed: int = 0, exact_when_agreed: bool = True) -> Interval:
    """``statistic(rows)`` (a function of row indices) with its percentile interval from a cluster
    bootstrap; Clopper-Pearson over clusters where every cluster's ``values`` agree (all 1 or all 0)."""
    values, clusters = np.asarray(values, dtype=np.float64), np.asarray(clusters)
    if len(values) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), "n/a: nothing attacked")
    point = float(statistic(np.arange(len(values))))
    n = len(np.unique(clusters))
    agreed = _all_agree(values, clusters) if exact_when_agreed else None
    if agreed is not None:
        lo, hi = clopper_pearson(n if agreed else 0, n, level)
        return Interval(point, lo, hi, f"Clopper-Pearson over {n} speakers (all agree)")
    boot = np.array([statistic(idx) for idx in cluster_resamples(clusters, n_boot, seed, strata)])
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return Interval(point, float("nan"), float("nan"), "n/a: no resample defines it")
    tail = (1 - level) / 2
    return Interval(point, float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail)),
                    f"speaker bootstrap ({n} speakers{', within gender' if strata is not None else ''})")


def balanced_accuracy(success: np.ndarray, female: np.ndarray) -> float:
    """Mean over the two genders of the mean ``success`` of that gender's units (per-gender recall
    averaged): a population unbalanced by gender cannot raise it by guessing the majority. NaN with
    one gender only."""
    success, female = np.asarray(success, dtype=np.float64), np.asarray(female).astype(bool)
    if not female.any() or female.all():
        return float("nan")
    return float((success[female].mean() + success[~female].mean()) / 2)


def majority_baseline(female: np.ndarray) -> float:
    """The accuracy of always guessing the attacked population's majority gender."""
    female = np.asarray(female).astype(bool)
    return float(max(female.mean(), 1 - female.mean())) if len(female) else float("nan")


def roc_auc(scores: np.ndarray, female: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``female`` (NaN with one class): the Mann-Whitney
    statistic, ties counted half (as sklearn's ``roc_auc_score``; rank-based, so cheap inside a bootstrap)."""
    from scipy.stats import rankdata

    female = np.asarray(female).astype(bool)
    n1 = int(female.sum())
    n0 = len(female) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[female].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def permutation_p_value(observed: float, null: list[float] | np.ndarray) -> float:
    """One-sided p-value of ``observed`` against ``null`` (statistics under other labellings):
    ``(1 + #{null >= observed}) / (1 + len(null))``; the smallest it can be is ``1 / (1 + len(null))``."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed):
        return float("nan")
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def speaker_labellings(female: dict[str, bool], limit: int, seed: int = 0) -> list[dict[str, bool]]:
    """Up to ``limit`` relabellings of speakers that keep the number of women and men, excluding the
    true labelling and its inverse (every gender flipped, which only trains the same attack reversed):
    the permutations of a control that can fail. All of them if there are at most ``limit``, else a
    seeded random sample of distinct ones.

    With as many women as men a relabelling's inverse is a relabelling too; they come in such pairs
    (a relabelling, then its inverse), so that the first ``2m`` hold ``m`` whole pairs. With few speakers
    every relabelling agrees with the truth on some speakers and an attack fitted on it still reads
    some gender, one way or the other; a pair's two attacks read it opposite ways, so a control made of
    whole pairs sits at chance unless the attack reads something it was not trained on.
    """
    names = sorted(female)
    truth = tuple(bool(female[s]) for s in names)
    n, k = len(names), sum(truth)
    paired = 2 * k == n
    flip = lambda lab: tuple(not v for v in lab)
    total = math.comb(n, k) - 1 - paired
    if limit <= 0 or total <= 0:
        return []
    rng = np.random.default_rng([seed, 8191])
    seen: set[tuple[bool, ...]] = {truth, flip(truth)}
    chosen: list[tuple[bool, ...]] = []
    if total <= max(limit, 64) and n <= 20:
        from itertools import combinations

        every = [tuple(i in w for i in range(n)) for w in combinations(range(n), k)]
        pool = [every[i] for i in rng.permutation(len(every))]
    else:
        pool = (tuple(bool(v) for v in rng.permutation(np.array(truth))) for _ in iter(int, 1))
    for lab in pool:
        if len(chosen) >= min(limit, total):
            break
        if lab in seen:
            continue
        seen.add(lab)
        chosen.append(lab)
        if paired and len(chosen) < min(limit, total):
            seen.add(flip(lab))
            chosen.append(flip(lab))
    return [dict(zip(names, lab)) for lab in chosen]


def uar_from_counts(counts: np.ndarray) -> float:
    """UAR from per-unit confusion counts ``(units, classes, 2)``: [..., 0] rows of that class,
    [..., 1] of them recognised; classes absent from every unit are left out."""
    counts = np.asarray(counts, dtype=np.float64)
    n, right = counts[..., 0].sum(0), counts[..., 1].sum(0)
    present = n > 0
    return float((right[present] / n[present]).mean()) if present.any() else float("nan")


def uar_interval(counts: np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """UAR over held-out speakers (``counts`` per speaker, see :func:`uar_from_counts`) with its
    speaker bootstrap interval."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3 or len(counts) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), "n/a: no per-speaker counts")
    return cluster_interval(np.zeros(len(counts)) + 0.5, np.arange(len(counts)), lambda idx: uar_from_counts(counts[idx]),
                            n_boot=n_boot, level=level, seed=seed, exact_when_agreed=False)
