"""How well an attack did, with intervals as wide as the evidence: ASR, balanced accuracy, AUC.

ASR as defined in the paper: for each attacked client, pick one of its updates at random from the
whole training run and predict its gender; repeat ``trials`` (10) times per client; ASR is the mean
over clients of the share of correct predictions. With ``pool_rounds = k > 1`` each trial pools k
random updates of that client (from different rounds), which is what an observer who keeps
listening can do; each attack says how it pools (:attr:`Scores.pool`).

What a privacy auditor needs beside the paper's ASR (see :mod:`fed_ser.core.statistics`):

* the **balanced accuracy** (the mean of the per-gender ASRs) and the **majority baseline** of the
  attacked population: on a population of 11 men and 3 women a constant "man" scores 78.6% ASR and
  50% balanced accuracy, so only the latter can tell leakage from imbalance;
* **intervals over speakers**: a cluster bootstrap in which a speaker's clients (and the same
  speaker attacked in several folds) are resampled together; an exact binomial interval over the
  speakers where they all agree;
* the **ROC AUC** and **TPR at low FPR** (Carlini et al., 2022) on **one score per attacked client**
  (its updates' scores averaged: a client's updates are near-duplicates of one another), with TPR at
  an FPR ``t`` only where at least ``1/t`` men (speakers) are attacked: "1% FPR" must mean accusing
  one man in a hundred, not one update of five men.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from fed_ser.core.statistics import (
    Interval,
    balanced_accuracy,
    cluster_interval,
    majority_baseline,
    roc_auc,
)

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


class CannotRun(ValueError):
    """An attack cannot run on these data (e.g. its fit meets one gender only): the driver reports it as not run,
    with this message, and runs the others. Any other error while scoring is a bug and propagates."""


class NotFinite(CannotRun):
    """Raised by an attack that meets recorded updates holding NaN/inf (a diverged training)."""


@dataclass
class Scores:
    """What an attack read from the server's view, before anyone compares it with the truth.

    ``p`` is P(female) per scored row: an update, or (``trials=1``) one score per client for the
    observers of aggregates; ``clients`` the client id of each row, as the server saw it; ``pool``
    the P(female) of several rows of one client pooled (the attack's own way of pooling rounds).
    """

    p: np.ndarray
    clients: np.ndarray
    pool: Callable[[np.ndarray], float] | None = None
    trials: int | None = None  # None: attack.trials; 1: one score per client (nothing to draw)

    def __post_init__(self) -> None:
        self.p = np.asarray(self.p, dtype=np.float64)
        self.clients = np.asarray(self.clients, dtype=np.int64)
        if len(self.p) != len(self.clients):
            raise ValueError(f"{len(self.p)} scores for {len(self.clients)} client ids")
        if self.pool is None:
            p = self.p
            self.pool = lambda idx: float(p[idx].mean())


@dataclass(frozen=True)
class Population:
    """The attacked clients as the evaluator knows them (ground truth no message ever carried):
    per client key, whether the client is a woman and which speaker it is (the bootstrap's cluster;
    a speaker attacked in several folds is one cluster)."""

    female: dict[int, int]
    speaker: dict[int, str]

    def __post_init__(self) -> None:
        if set(self.female) != set(self.speaker):
            raise ValueError("every attacked client needs a gender and a speaker")
        for s in set(self.speaker.values()):
            genders = {self.female[c] for c, sp in self.speaker.items() if sp == s}
            if len(genders) > 1:
                raise ValueError(f"speaker {s}: its clients are labelled with both genders; a speaker has one")


@dataclass
class Evaluation:
    """One attack's outcome on one set of attacked clients, before it is summarised.

    Kept apart from the summary so that the clients of several folds pool into one interval (client
    keys must then differ between folds, e.g. ``fold * 100000 + client``; a speaker keeps its key).
    """

    success: dict[str, dict[int, float]]  # k pooled rounds -> client key -> share of its trials right
    client_score: dict[int, float]  # client key -> its single-update P(female), averaged over its updates
    female: dict[int, int]  # client key -> 1 = female
    speaker: dict[int, str]  # client key -> speaker key
    updates: int  # scored rows
    runs: int = 1  # runs averaged (a control's labellings)
    extra: dict = field(default_factory=dict)


def evaluate_attack(scores: Scores, population: Population, *, key_offset: int = 0, trials: int = 10,
                    pool_rounds: list[int] | tuple[int, ...] = (1,), seed: int = 0) -> Evaluation:
    """The ASR trials of one attack for k = 1 and each ``pool_rounds``, against the truth.

    ``key_offset`` turns the server's client ids into the population's keys (a fold's offset).
    """
    keys = scores.clients + key_offset
    missing = sorted(set(keys.tolist()) - set(population.female))
    if missing:
        raise ValueError(f"attacked clients {missing[:5]} have no ground truth in the population")
    labels = np.array([population.female[int(c)] for c in keys], dtype=np.int64)
    trials = int(scores.trials or trials)
    success = {str(k): client_success(scores.pool, keys, labels, trials, k, seed)
               for k in sorted({1, *map(int, pool_rounds)})}
    if trials == 1:  # one score per client: pooling several rounds means nothing more
        success = {"1": success["1"]}
    client_score = {int(c): float(scores.p[keys == c].mean()) for c in np.unique(keys)}
    return Evaluation(success, client_score, {c: population.female[c] for c in client_score},
                      {c: population.speaker[c] for c in client_score}, len(keys))


def average_evaluations(evaluations: list[Evaluation]) -> Evaluation:
    """One evaluation of the same clients from several runs of an attack (a control's labellings):
    per client the mean share of its trials right and the mean score."""
    first = evaluations[0]
    success = {k: {c: float(np.mean([e.success[k][c] for e in evaluations])) for c in first.success[k]}
               for k in first.success}
    score = {c: float(np.mean([e.client_score[c] for e in evaluations])) for c in first.client_score}
    return Evaluation(success, score, first.female, first.speaker, first.updates, len(evaluations))


def merge_evaluations(evaluations: list[Evaluation]) -> Evaluation:
    """The clients of several evaluations (folds) as one; client keys must not collide."""
    merged = Evaluation({k: {} for k in evaluations[0].success}, {}, {}, {}, 0, evaluations[0].runs)
    for e in evaluations:
        if set(e.client_score) & set(merged.client_score):
            raise ValueError("the same client key appears in two evaluations; key clients by fold")
        for k in merged.success:
            merged.success[k].update(e.success.get(k, {}))
        merged.client_score.update(e.client_score)
        merged.female.update(e.female)
        merged.speaker.update(e.speaker)
        merged.updates += e.updates
    merged.success = {k: v for k, v in merged.success.items() if len(v) == len(merged.client_score)}
    return merged


def _rates(e: Evaluation, k: str, n_boot: int, seed: int) -> tuple[Interval, Interval]:
    clients = sorted(e.success[k])
    success = np.array([e.success[k][c] for c in clients])
    female = np.array([e.female[c] for c in clients])
    speaker = np.array([e.speaker[c] for c in clients])
    asr = cluster_interval(success, speaker, lambda idx: float(success[idx].mean()), n_boot=n_boot, seed=seed)
    both = female.any() and not female.all()
    if not both:
        balanced = Interval(float("nan"), float("nan"), float("nan"), "n/a: one gender attacked")
    else:
        balanced = cluster_interval(success, speaker, lambda idx: balanced_accuracy(success[idx], female[idx]),
                                    strata=female, n_boot=n_boot, seed=seed)
    return asr, balanced


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def roc_over_clients(e: Evaluation, fprs: tuple[float, ...] = FPR_POINTS, n_boot: int = 2000, seed: int = 0,
                     max_points: int = 200) -> dict:
    """ROC AUC (with its speaker-level interval), TPR at each FPR in ``fprs`` and the curve, over one
    score per attacked client. TPR at FPR ``t`` is the highest TPR of any threshold whose FPR is at
    most ``t`` (no interpolation: an attacker must pick a real threshold), and only where at least
    ``1/t`` men (speakers) are attacked; otherwise None with the reason in ``tpr_note``."""
    from sklearn.metrics import roc_curve

    clients = sorted(e.client_score)
    scores = np.array([e.client_score[c] for c in clients])
    female = np.array([e.female[c] for c in clients])
    speaker = np.array([e.speaker[c] for c in clients])
    men = len(set(speaker[female == 0].tolist()))
    if not female.any() or female.all():
        return {"auc": None, "auc_ci": [None, None], "tpr_at_fpr": {str(t): None for t in fprs},
                "tpr_note": {str(t): "n/a: one gender attacked" for t in fprs}, "roc": {"fpr": [], "tpr": []}}
    auc = cluster_interval(scores, speaker, lambda idx: roc_auc(scores[idx], female[idx]), strata=female,
                           n_boot=n_boot, seed=seed, exact_when_agreed=False)
    fpr, tpr, _ = roc_curve(female, scores)
    at, note = {}, {}
    for t in fprs:
        if men * t >= 1:
            at[str(t)], note[str(t)] = float(tpr[fpr <= t].max()), ""
        else:
            at[str(t)], note[str(t)] = None, f"n/a: {men} men"
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
    return {"auc": auc.point, "auc_ci": [_none_if_nan(auc.low), _none_if_nan(auc.high)], "tpr_at_fpr": at,
            "tpr_note": note, "roc": {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}}


def summarize(evaluations: list[Evaluation], n_boot: int = 2000, seed: int = 0) -> dict:
    """Every figure of an attack over the clients of ``evaluations`` together (folds pooled).

    ASR and balanced accuracy for each k with speaker-level intervals, the majority baseline, the
    population (speakers and clients per gender), ROC AUC with its interval and TPR at low FPR over
    one score per client. Intervals at 95%.
    """
    e = merge_evaluations(evaluations)
    clients = sorted(e.client_score)
    female = np.array([e.female[c] for c in clients])
    speakers = {e.speaker[c]: e.female[c] for c in clients}
    out: dict = {"asr_pooled": {}, "asr_pooled_ci": {}, "balanced_pooled": {}, "balanced_pooled_ci": {}}
    for k in e.success:
        asr, bal = _rates(e, k, n_boot, seed)
        out["asr_pooled"][k], out["asr_pooled_ci"][k] = asr.point, asr.as_list()
        out["balanced_pooled"][k], out["balanced_pooled_ci"][k] = _none_if_nan(bal.point), [_none_if_nan(x) for x in bal.as_list()]
        if k == "1":
            out["interval"] = asr.method
            out["balanced_interval"] = bal.method
    out.update({
        "asr": out["asr_pooled"]["1"], "asr_ci": out["asr_pooled_ci"]["1"],
        "balanced": out["balanced_pooled"]["1"], "balanced_ci": out["balanced_pooled_ci"]["1"],
        "majority": majority_baseline(female),
        **roc_over_clients(e, n_boot=n_boot, seed=seed),
        "clients": len(clients), "women_clients": int(female.sum()), "men_clients": int(len(female) - female.sum()),
        "speakers": len(speakers), "women_speakers": int(sum(speakers.values())),
        "men_speakers": int(len(speakers) - sum(speakers.values())),
        "updates": e.updates, "runs": e.runs,
        # one score for every client (e.g. nothing was inverted: the prior): it reads nothing, whatever its intervals say
        "constant": bool(np.ptp(np.array(list(e.client_score.values()))) == 0) if e.client_score else True,
    })
    return out
