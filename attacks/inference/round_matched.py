"""Round-matched shadow updates: classify each FedAvg update against simulated ones from the same round.

The paper's attacker trains on updates of its own shadow federations, which start from other global
models than the private run's: an update's elementwise values depend on the model it was computed at
at least as much as on the client's data, so the classifier learns the shadow run's models. The server
of the paper's threat model knows each round's global model, the client's ``num-examples`` and the
local settings (:class:`~attacks.inference.simulate.LocalSettings`), so it can do better (as the
feature-space attack does for FedSGD, :mod:`attacks.inference.feature_space`): for each attacked
update, **simulate the client's round from that round's global model** on virtual clients drawn from
its own speakers at the attacked client's size (:func:`attacks.inference.simulate.simulate_deltas`,
fed-ser's one local training loop), and classify the real update against those simulated ones.

What is classified is a summary of the first layer's update that keeps the client's
emotion-conditional input statistics (where gender is on real speech: the feature-space attack's
finding) and drops what the round's model puts there:

1. an elementwise **transform** ``T`` of the update: ``raw`` (the pseudo-gradient; SGD's update is
   the sum of its steps' gradients), ``sign``, or ``adam``: the inverse of Adam's first step.
   Adam's first step moves each weight by ``lr * g / (|g| + eps)``; at ``eps = 1e-8`` that is
   ``lr * sign(g)`` to within float32 rounding of the weight, *except* for small gradients, whose
   magnitude survives as ``1 - |step| / lr`` (``|g| ~ eps |r| / (1 - |r|)``, to ~2% relative for
   ``|g| < 1e-3`` on EmoDB's model; the largest entries keep only their sign). ``adam`` reads it back.
2. **de-mixing by emotion**: the first layer's weight gradient is ``sum_i delta_i x_i^T`` with
   ``delta_i`` the sample's backpropagated error, which points (at the round's model) roughly along a
   direction ``a_c`` set by its emotion ``c``. The attacker computes the ``a_c`` from its own rows at
   the round's model (:func:`emotion_directions`) and solves ``T(dW1) ~ sum_c a_c s_c^T`` for the
   four per-emotion input profiles ``s_c`` (least squares), plus the same for the bias.
3. **round conditioning**: each feature is standardised with the mean and spread of the simulated
   updates of the same round and size, so one logistic regression serves every round.

The logistic regression's inverse L2 strength and the transform are chosen by cross-validation over
the attacker's own speakers (one woman and one man held out at a time), never on the attacked
clients. A client's k updates are pooled by averaging their standardised summaries (for a linear
model: averaging their logits).

What it uses of the private federation: the recorded global models, each update and its
``num_examples``; the settings; nothing of the private clients' speakers, genders or features.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.nn import functional as F

from attacks.inference.base import AttackerData, ServerView
from attacks.inference.evaluate import NotFinite, Scores
from attacks.inference.simulate import LocalSettings, model_at, simulate_deltas
from fed_ser.recording.store import UpdateInfo, UpdateStore

TRANSFORMS = ("raw", "sign", "adam")


@dataclass
class AttackerSpeakers:
    """The attacker's own data: utterance rows ``X`` (normalised features), emotions ``y``, each row's
    ``speaker`` and each speaker's gender (``female[speaker]``)."""

    X: np.ndarray
    y: np.ndarray
    speaker: np.ndarray
    female: dict

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.int64)
        self.speaker = np.asarray(self.speaker).astype(str)
        self.female = {str(k): bool(v) for k, v in self.female.items()}
        if not (len(self.X) == len(self.y) == len(self.speaker)):
            raise ValueError("attacker data: X, y and speaker must have one row per utterance")
        missing = sorted(set(self.speaker.tolist()) - set(self.female))
        if missing:
            raise ValueError(f"attacker data: speakers without a gender: {missing}")
        if len(set(self.female[s] for s in self.speakers)) < 2:
            raise ValueError("attacker data: the attacker's speakers are of one gender only")
        if not np.isfinite(self.X).all():
            raise ValueError("attacker data: the features contain NaN/inf")

    @property
    def speakers(self) -> list[str]:
        return sorted(set(self.speaker.tolist()))

    def relabelled(self, female: dict) -> AttackerSpeakers:
        """The same rows with other genders per speaker (the permutation control)."""
        return AttackerSpeakers(self.X, self.y, self.speaker, female)


def virtual_client(data: AttackerSpeakers, speaker: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows drawn without replacement from one attacker speaker (all of them if it has fewer)."""
    rows = np.flatnonzero(data.speaker == speaker)
    pick = rng.choice(rows, min(n, len(rows)), replace=False)
    return data.X[pick], data.y[pick]


def emotion_directions(params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, n_classes: int = 4) -> np.ndarray:
    """``(classes, hidden)``: per emotion, the mean backpropagated error at the first layer's
    pre-activation of the rows of that emotion, at the model ``params`` (no dropout), unit norm."""
    model = model_at(params, 0.0)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    pre = model.dense1(Xt).detach().requires_grad_(True)
    h = torch.relu(model.dense2(torch.relu(pre)))
    loss = F.cross_entropy(model.out(h), torch.as_tensor(y), reduction="sum")
    (err,) = torch.autograd.grad(loss, pre)
    err = err.numpy().astype(np.float64)
    out = np.zeros((n_classes, err.shape[1]))
    for c in range(n_classes):
        if (y == c).any():
            out[c] = err[y == c].mean(0)
    return out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-30)


def transform(delta: np.ndarray, kind: str, step: float) -> np.ndarray:
    """The elementwise transform ``T`` of an update ``delta`` (``theta - theta_k``) whose largest
    possible step per element is ``step`` (Adam: ``lr * T``; see the module's docstring)."""
    if kind == "raw":
        return delta / step
    if kind == "sign":
        return np.sign(delta)
    if kind == "adam":
        r = np.clip(np.abs(delta) / step, 0.0, 1.0 - 1e-7)
        return np.sign(delta) * np.log1p(r / (1.0 - r))  # log1p(|g| / eps): the magnitude Adam's eps leaves
    raise ValueError(f"round-matched attack: transform {kind!r} is not one of {TRANSFORMS}")


def summary(delta: dict[str, np.ndarray], directions: np.ndarray, kind: str, step: float, ridge: float = 1e-3) -> np.ndarray:
    """The classified summary of one update: per emotion, the de-mixed input profile of the first layer's
    transformed weight update, its bias counterpart, and the transformed output-layer bias update."""
    A = directions
    M = A @ A.T
    M = M + ridge * np.trace(M) / len(M) * np.eye(len(M))
    W = transform(delta["dense1.weight"].astype(np.float64), kind, step)
    b = transform(delta["dense1.bias"].astype(np.float64), kind, step)
    profiles = np.linalg.solve(M, A @ W)
    counts = np.linalg.solve(M, A @ b)
    out_b = transform(delta["out.bias"].astype(np.float64), kind, step)
    return np.concatenate([profiles.reshape(-1), counts, out_b])


def _cv_splits(speakers: list[str], female: dict, most: int = 8) -> list[tuple[list[str], list[str]]]:
    """Hold out one woman and one man at a time (every pair, or ``most`` of them spread over the speakers), so
    each split's held-out set has both genders."""
    women = [s for s in speakers if female[s]]
    men = [s for s in speakers if not female[s]]
    pairs = [(w, m) for i, w in enumerate(women) for m in men[i % len(men):] + men[: i % len(men)]]
    pairs = pairs[:: max(1, len(pairs) // most)][:most]
    return [([s for s in speakers if s not in pair], list(pair)) for pair in pairs]


def _balanced_accuracy(p: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([np.mean((p[labels == g] > 0.5) == g) for g in (0, 1) if (labels == g).any()]))


@dataclass
class RoundMatchedAttack:
    """Fit on simulated updates of the attacked rounds, score real ones (label 1 = female).

    ``per_update``: virtual clients simulated for each distinct (round, size) of the attacked updates,
    spread evenly over the attacker's speakers; ``transforms`` and ``l2_grid``: what cross-validation
    over the attacker's speakers chooses from (``transforms=None``: ``raw`` for SGD and FedSGD, all
    three for Adam)."""

    settings: LocalSettings
    per_update: int = 32
    transforms: Sequence[str] | None = None
    l2_grid: Sequence[float] = (0.001, 0.01, 0.1)
    seed: int = 0
    n_classes: int = 4
    # fitted
    chosen: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    _reference: dict = field(default_factory=dict, repr=False)  # (round, n) -> transform -> (directions, mean, std)
    _sims: dict = field(default_factory=dict, repr=False)  # the simulated summaries and their speakers
    _clf: LogisticRegression | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ fitting
    def _step(self, n: int) -> float:
        """The largest step per element of an update of a client with ``n`` rows: ``lr * T`` (Adam), or the
        pseudo-gradient's scale ``lr * T`` (SGD), 1 for a FedSGD gradient."""
        s = self.settings
        return 1.0 if s.algorithm == "fedsgd" else s.lr * s.steps(n)

    def _kinds(self) -> list[str]:
        if self.transforms is not None:
            bad = [t for t in self.transforms if t not in TRANSFORMS]
            if bad:
                raise ValueError(f"round-matched attack: transforms {bad} are not in {TRANSFORMS}")
            return list(self.transforms)
        adam = self.settings.algorithm == "fedavg" and self.settings.optimizer == "adam"
        return list(TRANSFORMS) if adam else ["raw"]

    def simulate(self, attacker: AttackerSpeakers, globals_of: Callable[[int], dict[str, np.ndarray]],
                 targets: Sequence[tuple[int, int]]) -> None:
        """Simulate ``per_update`` virtual clients for each ``(round, num_examples)`` of ``targets`` from the
        global model ``globals_of(round)`` and keep their summaries (what :meth:`fit_classifier` trains on;
        they do not depend on the speakers' genders, so the control's relabellings reuse them)."""
        if not targets:
            raise ValueError("round-matched attack: no attacked updates to match")
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        speakers = attacker.speakers
        kinds = self._kinds()
        groups = sorted({(int(r), int(n)) for r, n in targets})
        feats: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
        spk: list[str] = []
        self._reference = {}
        for rnd, n in groups:
            params = {k: np.asarray(v, dtype=np.float32) for k, v in globals_of(rnd).items()}
            A = emotion_directions(params, attacker.X, attacker.y, self.n_classes)
            # the attacker's speakers in turn (each as often), or a fresh draw of them where it has more than per_update
            order = rng.permutation(max(self.per_update, len(speakers)))[: self.per_update]
            who = [speakers[i % len(speakers)] for i in order]
            clients = [virtual_client(attacker, s, n, rng) for s in who]
            deltas = simulate_deltas(params, clients, self.settings, rng.integers(0, 2**31, len(clients)))
            for k in kinds:
                f = np.stack([summary(d, A, k, self._step(n)) for d in deltas])
                mean, std = f.mean(0), f.std(0) + 1e-12
                self._reference.setdefault((rnd, n), {})[k] = (A, mean, std)
                feats[k].append((f - mean) / std)
            spk += who
        self._sims = {"features": {k: np.concatenate(v) for k, v in feats.items()}, "speaker": np.array(spk),
                      "speakers": speakers}
        self.history = {"simulated_updates": len(spk), "groups": len(groups), "speakers": len(speakers),
                        "simulate_seconds": time.perf_counter() - t0}

    def fit_classifier(self, female: dict) -> RoundMatchedAttack:
        """Fit the classifier on the simulated summaries, each labelled with its speaker's gender in
        ``female`` (the transform and L2 strength by cross-validation over the speakers)."""
        if not self._sims:
            raise RuntimeError("round-matched attack: simulate first")
        t0 = time.perf_counter()
        spk, speakers = self._sims["speaker"], self._sims["speakers"]
        female = {str(k): bool(v) for k, v in female.items()}
        labels = np.array([int(female[s]) for s in spk])
        kinds = list(self._sims["features"])
        splits = _cv_splits(speakers, female)
        scores = {}
        for k in kinds:
            Z = self._sims["features"][k]
            for c in self.l2_grid:
                accs = []
                for train, held in splits:
                    tr, te = np.isin(spk, train), np.isin(spk, held)
                    if not te.any() or len(np.unique(labels[tr])) < 2:
                        continue  # held-out speakers with no simulated client (many speakers, few simulations)
                    clf = LogisticRegression(C=c, max_iter=2000).fit(Z[tr], labels[tr])
                    accs.append(_balanced_accuracy(clf.predict_proba(Z[te])[:, 1], labels[te]))
                scores[(k, c)] = float(np.mean(accs)) if accs else 0.5
        (kind, c), best = max(scores.items(), key=lambda kv: (kv[1], -kinds.index(kv[0][0]), -kv[0][1]))
        self._clf = LogisticRegression(C=c, max_iter=5000).fit(self._sims["features"][kind], labels)
        self.chosen = {"transform": kind, "l2": c, "cv_balanced_accuracy": best}
        self.history = {**self.history, "cv": {f"{k}/{c}": v for (k, c), v in scores.items()},
                        "fit_seconds": time.perf_counter() - t0}
        return self

    def fit(self, attacker: AttackerSpeakers, globals_of: Callable[[int], dict[str, np.ndarray]],
            targets: Sequence[tuple[int, int]]) -> RoundMatchedAttack:
        """:meth:`simulate` then :meth:`fit_classifier` with the attacker's genders."""
        self.simulate(attacker, globals_of, targets)
        return self.fit_classifier(attacker.female)

    # ------------------------------------------------------------------ scoring
    def standardised(self, delta: dict[str, np.ndarray], round: int, n: int) -> np.ndarray:
        """The summary of one real update, standardised with its (round, size)'s simulated updates."""
        ref = self._reference.get((int(round), int(n)))
        if ref is None:
            raise ValueError(f"round-matched attack: round {round}, {n} examples was not among the fitted targets")
        A, mean, std = ref[self.chosen["transform"]]
        return (summary(delta, A, self.chosen["transform"], self._step(n)) - mean) / std

    def logit(self, Z: np.ndarray) -> np.ndarray:
        """The classifier's log-odds of female for standardised summaries (rows)."""
        if self._clf is None:
            raise RuntimeError("round-matched attack: fit it first")
        return self._clf.decision_function(np.atleast_2d(Z))

    def p_female(self, Z: np.ndarray) -> np.ndarray:
        """P(female) of standardised summaries (one row per update, or a pooled mean of rows)."""
        if self._clf is None:
            raise RuntimeError("round-matched attack: fit it first")
        return self._clf.predict_proba(np.atleast_2d(Z))[:, 1]

    def score_arrays(self, deltas: Sequence[dict[str, np.ndarray]], rounds: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
        """``(updates, summary)`` standardised summaries of real updates (``theta - theta_k`` arrays)."""
        return np.stack([self.standardised(d, r, n) for d, r, n in zip(deltas, rounds, sizes)])

    # ------------------------------------------------------------------ the store
    def fit_store(self, attacker: AttackerSpeakers, store: UpdateStore, updates: Sequence[UpdateInfo]) -> RoundMatchedAttack:
        """:meth:`fit` on the rounds and sizes of ``updates`` with ``store``'s recorded global models."""
        return self.fit(attacker, lambda r: _global(store, r), [(u.round, u.num_examples) for u in updates])

    def summaries(self, store: UpdateStore, updates: Sequence[UpdateInfo]) -> np.ndarray:
        """Standardised summaries of recorded updates (what :meth:`score` and :meth:`scorer` read)."""
        _check_kind(updates, self.settings)
        return self.score_arrays([store.read(u) for u in updates], [u.round for u in updates], [u.num_examples for u in updates])

    def score(self, store: UpdateStore, updates: Sequence[UpdateInfo]) -> np.ndarray:
        """P(female) of each recorded update."""
        return self.p_female(self.summaries(store, updates))

    def scorer(self, Z: np.ndarray) -> Callable[[np.ndarray], float]:
        """``score_of(indices)``: a client's k updates (rows of ``Z``, :meth:`summaries`) pooled by
        averaging their standardised summaries (for this linear model: their logits)."""
        return lambda idx: float(self.p_female(Z[np.asarray(idx)].mean(0))[0])


def _global(store: UpdateStore, rnd: int) -> dict[str, np.ndarray]:
    rec = store.global_record(rnd)
    if rec is None:
        raise ValueError(f"{store.path}: round {rnd} has no recorded global model; the round-matched attack needs it")
    return store.read(rec)


def _check_kind(updates: Sequence[UpdateInfo], settings: LocalSettings) -> None:
    want = "gradient" if settings.algorithm == "fedsgd" else "delta"
    odd = {u.kind for u in updates} - {want}
    if odd:
        raise ValueError(f"round-matched attack: updates of kind {sorted(odd)} under fl.algorithm={settings.algorithm} "
                         f"(expected {want!r})")


class RoundMatched:
    """The round-matched attack as an :class:`~attacks.inference.base.Attack` (``attack.round_matched``):
    it applies to FedAvg runs whose global models were recorded. Its fit reads the view (the attacked
    rounds and sizes); the simulations do not depend on the attacker's labels, so the control's
    relabellings of one attacker and view reuse them and refit only the classifier."""

    name: ClassVar[str] = "round-matched"
    fit_reads_view: ClassVar[bool] = True
    costly: ClassVar[bool] = False
    labels: ClassVar[dict[str, str]] = {"round-matched": "round-matched shadow updates (FedAvg)"}
    #: the last simulation, by what it depends on (the attacker's rows, the store, the targets, the settings), with the
    #: view's standardised summaries per transform (label-free too): one entry
    _simulated: ClassVar[dict[tuple, tuple[RoundMatchedAttack, dict[str, np.ndarray]]]] = {}

    def __init__(self, *, per_update: int = 32, seed: int = 0):
        self.per_update, self.seed = per_update, seed
        self.fitted: RoundMatchedAttack | None = None
        self._summaries: dict[str, np.ndarray] = {}  # transform -> the view's standardised summaries (shared by the controls)

    @classmethod
    def from_settings(cls, attack: Mapping) -> RoundMatched | None:
        rm = attack["round_matched"]
        if not bool(rm["enabled"]):
            return None
        return cls(per_update=int(rm["per_update"]), seed=int(attack["seed"]))

    def applies(self, attacker: AttackerData, view: ServerView) -> bool:
        return self.why_not(attacker, view) is None

    def why_not(self, attacker: AttackerData, view: ServerView) -> str | None:
        """Why this attack cannot run here (for the report's "Attacks not run"), or None when it can."""
        if view.local.algorithm != "fedavg":
            return "reads FedAvg updates only (this run is FedSGD: the feature-space attack inverts its gradients)"
        if not view.updates or view.store is None:
            return "no client updates recorded (SecAgg+: the server sees sums only)"
        if view.store.global_record(view.updates[0].round) is None:
            return "the rounds' global models were not recorded"
        if len(set(attacker.speaker_female().values())) < 2:
            return "the attacker's speakers are of one gender"
        return None

    @staticmethod
    def speakers_of(attacker: AttackerData) -> AttackerSpeakers:
        """The attacker's client rows with their speakers and genders."""
        rows = attacker.client >= 0
        return AttackerSpeakers(attacker.X[rows], attacker.y[rows], attacker.row_speaker[rows], attacker.speaker_female())

    def fit(self, attacker: AttackerData, view: ServerView) -> None:
        assert view.store is not None
        targets = tuple((u.round, u.num_examples) for u in view.updates)
        rows = attacker.client >= 0
        digest = hashlib.sha256(np.ascontiguousarray(attacker.X[rows]).tobytes())
        digest.update(np.ascontiguousarray(attacker.y[rows]).tobytes())
        digest.update("\0".join(map(str, attacker.row_speaker[rows])).encode())
        stat = view.store.data_path.stat()  # the store's contents, not only its path (a run recorded again in place)
        key = (digest.hexdigest(), str(view.store.path), stat.st_size, stat.st_mtime_ns, targets, view.local, self.per_update, self.seed)
        if key not in self._simulated:
            base = RoundMatchedAttack(view.local, per_update=self.per_update, seed=self.seed)
            base.simulate(self.speakers_of(attacker), lambda r: _global(view.store, r), targets)
            type(self)._simulated = {key: (base, {})}  # one held: the next view's simulations replace it
        base, self._summaries = self._simulated[key]
        self.fitted = copy.copy(base).fit_classifier(attacker.speaker_female())

    def score(self, view: ServerView) -> dict[str, Scores]:
        if self.fitted is None or view.store is None:
            raise RuntimeError("the round-matched attack is not fitted")
        kind = self.fitted.chosen["transform"]
        if kind not in self._summaries:
            self._summaries[kind] = self.fitted.summaries(view.store, view.updates)
        Z = self._summaries[kind]
        if not np.isfinite(Z).all():
            raise NotFinite("summaries of the attacked updates contain NaN/inf: the recorded updates are not finite")
        return {"round-matched": Scores(self.fitted.p_female(Z), view.clients, self.fitted.scorer(Z))}

    def describe(self) -> dict:
        return {} if self.fitted is None else {"chosen": dict(self.fitted.chosen),
                                               "history": {k: v for k, v in self.fitted.history.items() if k != "cv"}}
