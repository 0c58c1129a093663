"""The attack stage of a fold, and how folds pool: every registered attack fitted on the attacker's
data, scored on the server's view, then evaluated against the truth; beside it, its control.

The **control** is a permutation test that can fail: the attacker's speakers are relabelled
(genders shuffled across speakers, a speaker's clients kept together, the true labelling and its
inverse excluded: :func:`fed_ser.core.statistics.speaker_labellings`), each attack is fitted again
on each relabelling and scored on the same view. Their balanced accuracies are the null
distribution of the real attack's: the p-value is the share of relabellings that do as well
(with the real one counted), so with ``L`` relabellings it can be no smaller than ``1/(L+1)``.
The control's own average must sit at chance: a control above chance says the attack reads
something other than what it was trained on (a leak in the pipeline), and the report says so.

Folds whose attacker is the same (one shadow federation for every fold) share their relabellings;
folds with their own attackers (``shadow.mode=speakers``) pool any combination of their folds'
relabellings, so the test's resolution grows with the folds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from attacks.inference.base import Attack, AttackerData, ServerView
from attacks.inference.evaluate import CannotRun, Evaluation, Population, Scores, average_evaluations, evaluate_attack, merge_evaluations, summarize
from attacks.inference.registry import build_attacks, make_attack
from fed_ser.core.statistics import Interval, balanced_accuracy, cluster_resamples, permutation_p_value, speaker_labellings
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.experiments.settings import attack_settings
from fed_ser.recording.store import UpdateInfo, UpdateStore

FOLD_KEY = 100_000  # client key = fold * FOLD_KEY + client id: clients of all folds pooled in one interval
#: At most this many combinations of the folds' relabellings make the pooled null distribution (they cost no fit:
#: each fold's relabelled attacks are fitted once; with 5 folds of 4 relabellings there are 1,024 combinations)
NULL_COMBINATIONS = 999


def client_speakers(data: FederatedData) -> np.ndarray:
    """Each client's speaker as ``<corpus>/<speaker>`` (speaker ids repeat across corpora)."""
    return np.char.add(np.char.add(data.client_corpus.astype(str), "/"), data.client_speaker.astype(str))


def attacker_data(data: FederatedData, store: UpdateStore | None = None, updates: list[UpdateInfo] | None = None) -> AttackerData:
    """The attacker's own data (its shadow data set and, if any, its shadow federation's updates)."""
    updates = list(updates or [])
    bad = [u.client for u in updates if not 0 <= u.client < data.num_clients]
    if bad:
        raise ValueError(f"{store.path if store else 'shadow store'}: updates from clients {sorted(set(bad))[:5]} have no ground truth")
    return AttackerData(X=data.X, y=data.y, client=data.client, client_speaker=client_speakers(data),
                        client_female=data.client_gender == "F", store=store, updates=updates, train=data.split == TRAIN,
                        X_raw=data.X_raw)


def population(data: FederatedData, clients: Iterable[int], fold: int) -> Population:
    """The attacked clients' truth, keyed ``fold * FOLD_KEY + client`` (their speaker keys stay the same
    in every fold, so a speaker attacked in several folds is one cluster)."""
    speakers = client_speakers(data)
    clients = sorted({int(c) for c in clients})
    return Population({fold * FOLD_KEY + c: int(data.client_gender[c] == "F") for c in clients},
                      {fold * FOLD_KEY + c: str(speakers[c]) for c in clients})


@dataclass
class FoldAttacks:
    """One fold's attacks: what they read (no truth in it), their evaluations and their controls'."""

    scores: dict[str, Scores]
    evaluations: dict[str, Evaluation]
    controls: dict[str, list[Evaluation]]  # evaluation name -> one evaluation per relabelling, in their order
    attacker: str  # the attacker's fingerprint: folds with the same one share their relabellings
    labellings: int  # relabellings of the attacker's speakers available to the controls
    described: dict[str, dict] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    updates: int = 0  # client updates the server received (none under SecAgg+)
    shadow_updates: int = 0  # the attacker's shadow federations' updates
    inversion: dict | None = None
    aggregate: dict | None = None
    signal: dict | None = None


class AttackStage:
    """Fits, scores and evaluates the registered attacks; an attack fitted on the attacker's data alone
    (not on the view) is fitted once per attacker and labelling and reused by every fold that shares them."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        settings = attack_settings(cfg)  # attack.control_permutations, attack.cnn_control_permutations, ... checked
        self.trials, self.seed, self.pools = settings.trials, settings.seed, list(settings.pool_rounds)
        self.permutations, self.cnn_permutations = settings.control_permutations, settings.cnn_control_permutations
        self.fitted: dict[tuple[str, str], Attack] = {}

    def _fit(self, name: str, attacker: AttackerData, view: ServerView) -> Attack:
        key = (name, attacker.fingerprint())
        if key in self.fitted:
            return self.fitted[key]
        attack = make_attack(name, self.cfg.attack)
        try:
            attack.fit(attacker, view)
        except ValueError as e:  # data this attack cannot be fitted on (one gender, a diverged shadow federation)
            raise e if isinstance(e, CannotRun) else CannotRun(str(e)) from e
        if not attack.fit_reads_view:
            self.fitted[key] = attack
        return attack

    def score(self, attacker: AttackerData, view: ServerView) -> tuple[dict[str, Scores], dict[str, dict], dict[str, str]]:
        """Every applicable attack fitted and scored: the scores, what each fit produced, and the labels."""
        scores, described, labels = {}, {}, {}
        for name, attack in build_attacks(self.cfg.attack).items():
            if not attack.applies(attacker, view):
                why = getattr(attack, "why_not", None)  # an attack may say why (e.g. FedAvg only)
                described[name] = {"not_run": why(attacker, view) if why else "does not apply to these data (e.g. no shadow "
                                   "updates of both genders, nothing inverted)"}
                print(f"[attack] {name}: {described[name]['not_run']}", flush=True)
                continue
            try:  # an attack that cannot be fitted on these data (e.g. a diverged shadow federation) is not run
                fitted = self._fit(name, attacker, view)
                read = fitted.score(view)
            except CannotRun as e:  # not fittable here, or NaN updates met: the other attacks still run, the report says why
                described[name] = {"not_run": str(e)}
                print(f"[attack] {name}: not run: {e}", flush=True)
                continue
            bad = [ev for ev, sc in read.items() if not np.isfinite(sc.p).all()]
            if bad:  # e.g. a diverged federation's NaN updates read through a classifier: no score to evaluate
                described[name] = {"not_run": f"its scores ({', '.join(bad)}) are not finite: the recorded updates "
                                              "it read hold NaN/inf (a diverged training)"}
                print(f"[attack] {name}: not run: {described[name]['not_run']}", flush=True)
                continue
            scores.update(read)
            described[name] = fitted.describe()
            labels.update(getattr(fitted, "labels", {}))
        return scores, described, labels

    def run(self, attacker: AttackerData, view: ServerView, truth: Population, fold: int, control: bool) -> FoldAttacks:
        """This fold's attacks, evaluated on ``truth``, with their controls when ``control``."""
        scores, described, labels = self.score(attacker, view)
        offset = fold * FOLD_KEY
        evaluate = lambda s: evaluate_attack(s, truth, key_offset=offset, trials=self.trials, pool_rounds=self.pools, seed=self.seed)
        evaluations = {name: evaluate(s) for name, s in scores.items()}
        relabellings = speaker_labellings(attacker.speaker_female(), max(self.permutations, self.cnn_permutations), self.seed)
        controls: dict[str, list[Evaluation]] = {}
        if control:
            for name, attack in build_attacks(self.cfg.attack).items():
                if not attack.applies(attacker, view):
                    continue
                n = self.cnn_permutations if attack.costly else self.permutations
                for j, female in enumerate(relabellings[:n]):
                    relabelled = attacker.relabelled(female)
                    if (name in described and "not_run" in described[name]) or not attack.applies(relabelled, view):
                        continue  # not run on the true labels; or e.g. the relabelled shadow updates hold one gender
                    print(f"[attack] fold {fold}: control {j + 1}/{min(n, len(relabellings))} of {name}", flush=True)
                    try:
                        read = self._fit(name, relabelled, view).score(view)
                    except CannotRun as e:
                        print(f"[attack] fold {fold}: control {j + 1} of {name} not run: {e}", flush=True)
                        described[name]["control_skipped"] = described[name].get("control_skipped", 0) + 1
                        continue
                    for ev_name, s in read.items():
                        if ev_name in scores:
                            controls.setdefault(ev_name, []).append(evaluate(s))
        return FoldAttacks(scores, evaluations, controls, attacker.fingerprint(), len(relabellings), described, labels,
                           updates=len(view.updates), shadow_updates=len(attacker.updates))


def _balanced_point(evaluations: list[Evaluation]) -> float:
    e = merge_evaluations(evaluations)
    clients = sorted(e.success["1"])
    return balanced_accuracy(np.array([e.success["1"][c] for c in clients]), np.array([e.female[c] for c in clients]))


def permutation_null(per_fold: list[list[Evaluation]], shared: bool, limit: int, seed: int = 0) -> list[float]:
    """The pooled balanced accuracies of the controls' relabellings: the ``j``-th of every fold together
    when the folds share one attacker (``shared``), else up to ``limit`` distinct combinations of one
    relabelling per fold (all of them if there are no more)."""
    if not per_fold or any(not c for c in per_fold):
        return []
    if shared:
        combos = [(j,) * len(per_fold) for j in range(min(len(c) for c in per_fold))]
    else:
        sizes = [len(c) for c in per_fold]
        total = int(np.prod(sizes, dtype=np.float64)) if np.prod(sizes, dtype=np.float64) < 1e9 else 10**9
        if total <= limit:
            combos = list(itertools.product(*(range(n) for n in sizes)))
        else:
            rng, seen = np.random.default_rng([seed, 131]), set()
            while len(seen) < limit:
                seen.add(tuple(int(rng.integers(0, n)) for n in sizes))
            combos = sorted(seen)
    return [_balanced_point([per_fold[f][j] for f, j in enumerate(combo)]) for combo in combos]


def control_interval(per_fold: list[list[Evaluation]], shared: bool, seed: int = 0, n_boot: int = 2000) -> Interval:
    """The control's balanced accuracy (its relabellings' per-client success averaged) with a 95% interval
    that resamples both the attacked speakers (within gender) and the relabellings: a control can sit
    off chance on one population with few relabellings by chance alone, and only a control above this
    interval's reach says the attack reads something it was not trained on."""
    clients = sorted(c for f in per_fold for c in f[0].success["1"])
    fold_of = {c: i for i, f in enumerate(per_fold) for c in f[0].success["1"]}
    # success[c, j]: client c's share right under its fold's j-th relabelling
    width = max(map(len, per_fold))
    S = np.full((len(clients), width), np.nan)
    for i, c in enumerate(clients):
        for j, e in enumerate(per_fold[fold_of[c]]):
            S[i, j] = e.success["1"][c]
    female = np.array([per_fold[fold_of[c]][0].female[c] for c in clients])
    speaker = np.array([per_fold[fold_of[c]][0].speaker[c] for c in clients])
    counts = np.array([len(f) for f in per_fold])
    rng = np.random.default_rng([seed, 977])
    mean = lambda picks: np.nanmean(np.take_along_axis(S, picks, axis=1), axis=1)
    point = balanced_accuracy(np.nanmean(S, axis=1), female)
    boot = []
    for rows in cluster_resamples(speaker, n_boot, seed, strata=female):
        if shared:
            picks = np.broadcast_to(rng.integers(0, counts.min(), counts.min()), (len(clients), counts.min()))
        else:
            picks = np.stack([rng.integers(0, counts[fold_of[c]], width) for c in clients])
        boot.append(balanced_accuracy(mean(picks)[rows], female[rows]))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return Interval(point, float(lo), float(hi), "bootstrap over speakers and relabellings")


def pooled_summary(folds: list[FoldAttacks], limit: int = NULL_COMBINATIONS, seed: int = 0) -> dict[str, dict]:
    """Per evaluation name: :func:`attacks.inference.evaluate.summarize` over the folds' clients, and,
    where every fold ran its control, the control's summary (its relabellings averaged) with the
    real attack's permutation p-value on the balanced accuracy."""
    names = list(dict.fromkeys(n for f in folds for n in f.evaluations))
    shared = len({f.attacker for f in folds}) == 1
    out = {}
    for name in names:
        evs = [f.evaluations[name] for f in folds if name in f.evaluations]
        summary = summarize(evs, seed=seed)
        per_fold = [f.controls.get(name, []) for f in folds if name in f.evaluations]
        if per_fold and all(per_fold):
            null = permutation_null(per_fold, shared, limit, seed)
            control = summarize([average_evaluations(c) for c in per_fold], seed=seed)
            ci = control_interval(per_fold, shared, seed)
            summary["control"] = {
                "balanced": control["balanced"], "balanced_ci": ci.as_list(), "asr": control["asr"],
                "asr_ci": control["asr_ci"], "auc": control["auc"], "relabellings_per_fold": [len(c) for c in per_fold],
                # with one relabelling a fold's control reads whatever gender that relabelling still carries:
                # only whole pairs (a relabelling and its inverse) can say a control sits above chance
                "null": null, "above_chance": bool(np.isfinite(ci.low) and ci.low > 0.5) if min(map(len, per_fold)) >= 2 else None}
            summary["permutations"] = len(null)
            summary["p_value"] = permutation_p_value(summary["balanced"], null) if summary["balanced"] is not None else None
        out[name] = summary
    return out
