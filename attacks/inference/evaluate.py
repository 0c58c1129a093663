"""Attack success rate (ASR) with its confidence interval, ROC AUC and TPR at low FPR.

ASR as defined in the paper: for each private client, pick one of its updates at random from
the whole training run and predict its gender; repeat ``trials`` (10) times per client; ASR is
the mean over clients of the share of correct predictions. With ``pool_rounds = k > 1`` each
trial pools k random updates of that client (from different rounds), which is what an observer
who keeps listening can do; each attack says how it pools (the CNN averages its k P(female), the
feature-space attacks average what they read from the k updates before predicting).

What a privacy auditor needs beside the point estimate:

* the **95% interval** of the ASR, a bootstrap over the attacked clients (the unit the ASR
  averages over; a few dozen clients give intervals of +/- 10 points, which is the honest answer);
* the **ROC AUC** of the per-update score (threshold-free: an attack at 50% ASR may still rank
  clients well), and the **TPR at 10% and 1% FPR** (how many women an attacker finds when it may
  wrongly accuse 1 man in 100 of being one), following Carlini et al. (2022).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

FPR_POINTS = (0.1, 0.01)


def client_trials(clients: np.ndarray, labels: np.ndarray, trials: int = 10, pool_rounds: int = 1,
                  seed: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """The ASR trials: ``(client, true label, indices of k random updates of that client)``,
    ``trials`` per client; shared by every attack so their ASRs use the same draws."""
    if not len(clients) == len(labels):
        raise ValueError("clients and labels must align")
    if pool_rounds < 1 or trials < 1:
        raise ValueError("attack.pool_rounds and attack.trials must be >= 1")
    rng = np.random.default_rng(seed)
    for c in np.unique(clients):
        rows = np.flatnonzero(clients == c)
        for _ in range(trials):
            yield int(c), int(labels[rows[0]]), rng.choice(rows, size=pool_rounds, replace=len(rows) < pool_rounds)


def client_success(score_of: Callable[[np.ndarray], float], clients: np.ndarray, labels: np.ndarray,
                   trials: int = 10, pool_rounds: int = 1, seed: int = 0) -> dict[int, float]:
    """Per attacked client, the share of its trials whose pooled P(female) falls on the right side of 0.5.

    ``score_of(indices)`` is the attack's P(female) for the updates ``indices`` of one client pooled.
    """
    hits: dict[int, list[int]] = {}
    for client, truth, pick in client_trials(clients, labels, trials, pool_rounds, seed):
        hits.setdefault(client, []).append(int((score_of(pick) > 0.5) == truth))
    return {c: float(np.mean(v)) for c, v in hits.items()}


def attack_success_rate(p_female: np.ndarray, clients: np.ndarray, labels: np.ndarray, trials: int = 10,
                        pool_rounds: int = 1, seed: int = 0) -> float:
    """ASR over clients; ``p_female[i]`` is the attack's output for update ``i`` of ``clients[i]``
    (k pooled updates: their mean P(female))."""
    if len(p_female) != len(clients):
        raise ValueError("p_female, clients and labels must align")
    success = client_success(lambda idx: float(p_female[idx].mean()), clients, labels, trials, pool_rounds, seed)
    return float(np.mean(list(success.values()))) if success else float("nan")


def bootstrap_interval(values: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per resampled unit)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def roc_metrics(scores: np.ndarray, labels: np.ndarray, fprs: tuple[float, ...] = FPR_POINTS,
                max_points: int = 200) -> dict:
    """ROC AUC of ``scores`` (P(female), label 1 = female), TPR at each FPR in ``fprs`` and the curve.

    TPR at FPR ``t`` is the highest TPR of any threshold whose FPR is at most ``t`` (no
    interpolation: an attacker must pick a real threshold). With fewer than ``1/t`` negatives the
    point is not measurable and is reported as None.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    n_neg = int((labels == 0).sum())
    if n_neg == 0 or n_neg == len(labels):
        return {"auc": None, "tpr_at_fpr": {str(t): None for t in fprs}, "roc": {"fpr": [], "tpr": []}}
    fpr, tpr, _ = roc_curve(labels, scores)
    at = {str(t): (float(tpr[fpr <= t].max()) if n_neg * t >= 1 else None) for t in fprs}
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
    return {"auc": float(roc_auc_score(labels, scores)), "tpr_at_fpr": at,
            "roc": {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}}


@dataclass
class Evaluation:
    """One attack's outcome on one set of attacked clients, before it is summarised.

    Kept apart from the summary so that the clients of several folds can be pooled into one
    interval (client keys must then differ between folds, e.g. ``fold * 100000 + client``).
    """

    success: dict[str, dict[int, float]]  # k pooled rounds -> client -> share of its trials right
    scores: np.ndarray  # single-update P(female), for the ROC
    labels: np.ndarray  # per score, 1 = female
    clients: np.ndarray  # per attacked update, the client key
    runs: int = 1  # runs averaged (the scores hold one set per run)


def evaluate_attack(score_of: Callable[[np.ndarray], float], p_update: np.ndarray, clients: np.ndarray,
                    labels: np.ndarray, *, trials: int = 10, pool_rounds: list[int] | tuple[int, ...] = (1,),
                    seed: int = 0) -> Evaluation:
    """Run the ASR trials of one attack for k = 1 and each ``pool_rounds``.

    ``score_of(indices)`` pools updates of one client (see :func:`client_success`); ``p_update`` is
    the single-update P(female).
    """
    if not len(p_update) == len(clients) == len(labels):
        raise ValueError("scores, clients and labels must align")
    success = {str(k): client_success(score_of, clients, labels, trials, k, seed)
               for k in sorted({1, *map(int, pool_rounds)})}
    return Evaluation(success, np.asarray(p_update, dtype=np.float64), np.asarray(labels), np.asarray(clients))


def average_evaluations(evaluations: list[Evaluation]) -> Evaluation:
    """One evaluation of the same clients from several runs of an attack (e.g. the control's label
    permutations): per client the mean share of its trials right, and every run's scores."""
    first = evaluations[0]
    success = {k: {c: float(np.mean([e.success[k][c] for e in evaluations])) for c in first.success[k]}
               for k in first.success}
    return Evaluation(success, np.concatenate([e.scores for e in evaluations]),
                      np.concatenate([e.labels for e in evaluations]), first.clients, len(evaluations))


def summarize(evaluations: list[Evaluation], n_boot: int = 2000, seed: int = 0) -> dict:
    """ASR with its 95% interval (bootstrap over the attacked clients) for each k, ROC AUC, TPR at
    low FPR and the curve, over the clients of every evaluation together."""
    ks = list(evaluations[0].success)
    pooled, intervals = {}, {}
    for k in ks:
        merged: dict[int, float] = {}
        for e in evaluations:
            if set(e.success[k]) & set(merged):
                raise ValueError("the same client key appears in two evaluations; key clients by fold")
            merged.update(e.success[k])
        values = np.array(list(merged.values()))
        pooled[k] = float(values.mean()) if len(values) else float("nan")
        intervals[k] = list(bootstrap_interval(values, n_boot=n_boot, seed=seed))
    scores = np.concatenate([e.scores for e in evaluations])
    labels = np.concatenate([e.labels for e in evaluations])
    clients = np.concatenate([e.clients for e in evaluations])
    return {"asr": pooled["1"], "asr_ci": intervals["1"], "asr_pooled": pooled, "asr_pooled_ci": intervals,
            **roc_metrics(scores, labels), "clients": int(len(np.unique(clients))), "updates": int(len(clients)),
            "runs": evaluations[0].runs}
