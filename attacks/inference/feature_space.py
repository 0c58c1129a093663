"""The feature-space attack: gender from the statistics of the client's own recovered utterances.

Per-speaker z-normalisation hides gender from a single utterance, but not from how a speaker's
emotions differ from one another: a client's **emotion-conditional means** (four means of the
normalised features, one per emotion) reveal gender to a linear probe on real speech (EmoDB:
0.91-0.96 with speaker-disjoint folds). The paper's CNN reads the update elementwise and misses
it; this attack reads the update as what it is, a function of the client's batch:

1. :func:`attacks.inference.inversion.invert_fedsgd` recovers the batch's utterances and their emotions
   exactly from each FedSGD update (at the global model of its round);
2. :func:`emotion_means` turns the utterances recovered from k updates of a client (their union:
   a client that joins several rounds sends different combinations of the same utterances) into
   the client's statistics;
3. a logistic regression trained on the attacker's own speakers (the shadow data: no shadow
   federated training needed), simulated the same way, predicts gender. The simulation draws
   **virtual clients** from each attacker speaker's utterances, as many rows as the attacked
   clients hold (their ``num-examples``, sent in the clear), then random batches of the protocol's
   size, k of them pooled (:func:`virtual_clients`). Drawing them from the speaker rather than
   re-sampling the attacker's few fixed shards matters on real speech: with 4 attacker speakers of
   EmoDB the shards gave the classifier 16 compositions to memorise and a pooled AUC of 0.79 on the
   private clients; virtual clients give 0.97 (README, "Measured on real speech: EmoDB");
4. optionally (:meth:`FeatureSpaceAttack.adapted`, the ``feature-space-adaptive`` evaluation) the
   decision threshold is set from the attacked population itself: the two clusters of the
   clients' scores (two-means on their logits). The curious server sees every client's update, so
   this needs no label; it assumes both genders are among the attacked clients, and it is what
   turns a good ranking (AUC) into a good ASR when the classifier's scale does not carry from the
   attacker's speakers to the private ones.

What the attacker knows: the architecture, the batch size and dropout rate (the paper's
white-box attacker), the global model of each round (it sent it), each client's number of
examples, and its own shadow speakers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from attacks.inference.base import AttackerData, ServerView
from attacks.inference.evaluate import Scores
from attacks.inference.inversion import Recovered
from attacks.inference.settings import DRAWS_FROM
from attacks.inference.unrolled import SIGN_MAGNITUDE, reads_magnitude


def emotion_means(X: np.ndarray, y: np.ndarray, n_classes: int = 4) -> np.ndarray:
    """Concatenated per-emotion means of ``X`` (zeros, the speaker's normalised mean, where absent)."""
    d = X.shape[1] if X.ndim == 2 else 0
    out = np.zeros((n_classes, d))
    for c in range(n_classes):
        rows = y == c
        if rows.any():
            out[c] = X[rows].mean(0)
    return out.reshape(-1)


def pooled(recovered: list[Recovered]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct utterances (and labels) recovered from several updates of one client."""
    X = [r.inputs for r in recovered if len(r.inputs)]
    if not X:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    X, y = np.concatenate(X), np.concatenate([r.labels for r in recovered if len(r.inputs)])
    keep = []
    for i in range(len(X)):  # the same utterance from two rounds: recovered to ~1e-5, kept once
        if not any(np.abs(X[i] - X[j]).max() <= 1e-3 * (np.abs(X[j]).max() + 1e-12) for j in keep):
            keep.append(i)
    return X[keep], y[keep]


@dataclass
class FeatureSpaceAttack:
    """A fitted gender classifier on emotion-conditional means (label 1 = female)."""

    model: Pipeline
    dim: int  # input features per utterance
    n_classes: int = 4
    prior: float = 0.5  # P(female) when nothing was recovered
    history: dict = field(default_factory=dict)
    offset: float = 0.0  # subtracted from the classifier's logit (:meth:`adapted`); 0: its own threshold

    def p_female(self, X: np.ndarray, y: np.ndarray) -> float:
        """P(female) of a client whose recovered utterances are ``X`` with emotions ``y``."""
        if len(X) == 0:
            return self.prior
        p = float(self.model.predict_proba(emotion_means(X, y, self.n_classes)[None])[0, 1])
        return p if self.offset == 0.0 else float(expit(logit(np.clip(p, 1e-12, 1 - 1e-12)) - self.offset))

    def adapted(self, scores: np.ndarray) -> FeatureSpaceAttack:
        """This attack with its threshold moved to the boundary between the two clusters of the
        attacked clients' ``scores`` (their P(female) under this attack; see :func:`two_means_threshold`)."""
        scores = np.asarray(scores, dtype=np.float64)
        z = logit(np.clip(scores, 1e-12, 1 - 1e-12)) - self.offset
        return replace(self, offset=self.offset + two_means_threshold(z),
                       history={**self.history, "adapted_on": len(scores)})

    def scorer(self, recovered: list[Recovered]):
        """``score_of(indices)`` for :mod:`attacks.inference.evaluate`: k updates pooled as the union of what
        was recovered from them."""
        return lambda idx: self.p_female(*pooled([recovered[i] for i in idx]))


def simulated_statistics(X: np.ndarray, y: np.ndarray, client: np.ndarray, gender: np.ndarray, batch_size: int,
                         pools: list[int], draws: int, rng: np.random.Generator,
                         n_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """What the attack would read from each of the attacker's own clients: for each client and
    pool size k, ``draws`` times the emotion means of the union of k random batches of
    ``min(batch_size, n)`` of its rows (FedSGD's batch). Returns (statistics, labels)."""
    feats, labels = [], []
    for c in np.unique(client):
        rows = np.flatnonzero(client == c)
        b = min(batch_size, len(rows))
        for k in pools:
            for _ in range(draws):
                pick = np.unique(np.concatenate([rng.choice(rows, b, replace=False) for _ in range(k)]))
                feats.append(emotion_means(X[pick], y[pick], n_classes))
                labels.append(int(gender[c] == "F"))
    return np.array(feats), np.array(labels)


def two_means_threshold(z: np.ndarray, iters: int = 100) -> float:
    """The boundary between two clusters of the 1-d values ``z`` (Lloyd's two-means, started at
    their mean, which has values on both sides): the midpoint of the two clusters' means once no
    value changes side."""
    z = np.asarray(z, dtype=np.float64)
    if len(z) < 2 or np.ptp(z) == 0:
        return float(np.median(z)) if len(z) else 0.0
    t = float(z.mean())
    for _ in range(iters):
        lo, hi = z[z <= t], z[z > t]
        if not len(lo) or not len(hi):
            break
        new = float((lo.mean() + hi.mean()) / 2)
        if new == t:
            break
        t = new
    return t


VALIDATION_SHARE = 0.2  # of a client's rows, kept for validation by the protocol (fed_ser.data.partition)


def _own_znorm(X: np.ndarray) -> np.ndarray:
    return (X - X.mean(0)) / (X.std(0) + 1e-5)


def virtual_clients(X: np.ndarray, y: np.ndarray, speaker: np.ndarray, female: dict, sizes: np.ndarray,
                    shards: dict, batch_size: int, pools: list[int], draws: int, rng: np.random.Generator,
                    n_classes: int = 4, raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What the attack would read from clients made of the attacker's speakers: for each speaker
    and pool size k, ``draws`` x its number of ``shards`` times, a virtual client of n rows drawn
    from the speaker's utterances (n drawn from ``sizes``, the attacked clients' numbers of
    examples), the union of k random batches of ``min(batch_size, n)`` of them, its emotion means.
    ``female[s]``: speaker ``s`` is a woman. With ``raw`` (features before normalisation,
    ``features.norm=client``) the virtual client holds its n training rows and the protocol's share of
    validation rows, and z-normalises them over all of them, as a private client normalises its shard.
    Returns (statistics, labels)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0 or (sizes < 1).any():
        raise ValueError(f"the attacked clients' sizes must be >= 1, got {sizes.tolist()}")
    feats, labels = [], []
    for s in np.unique(speaker):
        rows = np.flatnonzero(speaker == s)
        for k in pools:
            for _ in range(draws * int(shards.get(s, 1))):
                n = min(int(rng.choice(sizes)), len(rows))
                if raw is None:
                    own, Xo = rng.choice(rows, n, replace=False), X
                else:
                    shard = rng.choice(rows, min(len(rows), max(n, int(round(n / (1 - VALIDATION_SHARE))))), replace=False)
                    Xo = np.zeros_like(raw)
                    Xo[shard] = _own_znorm(raw[shard].astype(np.float64))
                    own = shard[:n]
                b = min(batch_size, n)
                pick = np.unique(np.concatenate([rng.choice(own, b, replace=False) for _ in range(k)]))
                feats.append(emotion_means(Xo[pick], y[pick], n_classes))
                labels.append(int(female[s]))
    return np.array(feats), np.array(labels)


def train_feature_space_attack(X: np.ndarray, y: np.ndarray, client: np.ndarray, gender: np.ndarray, *,
                               batch_size: int, pools: list[int], draws: int = 20, l2: float = 0.01,
                               seed: int = 0, n_classes: int = 4, speaker: np.ndarray | None = None,
                               sizes: np.ndarray | None = None, draws_from: str = "speakers",
                               raw: np.ndarray | None = None) -> FeatureSpaceAttack:
    """Fit the classifier on the attacker's speakers: rows ``X`` (normalised features), emotions
    ``y``, their ``client`` index and each client's ``gender`` ("F"/"M").

    ``draws_from="speakers"`` trains on :func:`virtual_clients` (needs each row's ``speaker`` and
    the attacked clients' ``sizes``); ``"clients"`` re-samples the attacker's own clients as they
    are (:func:`simulated_statistics`, fed-ser's first version)."""
    if draws_from not in DRAWS_FROM:
        raise ValueError(f"attack.feature_space.draws_from must be one of {DRAWS_FROM}, got {draws_from!r}")
    if draws_from == "speakers" and (speaker is None or sizes is None):
        raise ValueError("draws_from='speakers' needs each row's speaker and the attacked clients' sizes")
    if len(set(gender[np.unique(client)].tolist())) < 2:
        raise ValueError("the attacker's data hold one gender only")
    if not np.isfinite(X).all():
        raise ValueError("the attacker's features contain NaN/inf")
    if l2 <= 0:
        raise ValueError(f"attack.feature_space.l2 must be > 0, got {l2}")
    rng = np.random.default_rng(seed)
    pools = sorted({1, *pools})
    if draws_from == "speakers":
        speaker = np.asarray(speaker)
        female = {}
        for s in np.unique(speaker):
            g = set(gender[np.unique(client[speaker == s])].tolist())
            if len(g) != 1:
                raise ValueError(f"speaker {s}: its clients are labelled {sorted(g)}; a speaker has one gender")
            female[s] = g == {"F"}
        shards = {s: len(np.unique(client[speaker == s])) for s in female}
        F, L = virtual_clients(X, y, speaker, female, np.asarray(sizes), shards, batch_size, pools, draws, rng, n_classes, raw)
    else:
        F, L = simulated_statistics(X, y, client, gender, batch_size, pools, draws, rng, n_classes)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=l2, max_iter=5000)).fit(F, L)
    return FeatureSpaceAttack(model, X.shape[1], n_classes,
                              history={"training_statistics": len(F), "draws_from": draws_from})


class FeatureSpace:
    """The feature-space attack as an :class:`~attacks.inference.base.Attack` (``attack.feature_space``):
    fitted on the attacker's speakers at the attacked clients' sizes, it reads what the inversion
    recovered from each update; ``feature-space-adaptive`` is the same classifier with its threshold
    between the two clusters of the attacked clients' scores (:meth:`FeatureSpaceAttack.adapted`)."""

    name: ClassVar[str] = "feature-space"
    fit_reads_view: ClassVar[bool] = True  # the virtual clients are drawn at the attacked clients' sizes
    costly: ClassVar[bool] = False
    labels: ClassVar[dict[str, str]] = {
        "feature-space": "feature-space (inversion)",
        "feature-space-adaptive": "feature-space, threshold from the attacked clients' score clusters"}

    def __init__(self, *, l2: float = 0.01, draws: int = 20, draws_from: str = "speakers", pools: list[int] | tuple[int, ...] = (1,),
                 seed: int = 0):
        if draws_from not in DRAWS_FROM:
            raise ValueError(f"attack.feature_space.draws_from: {draws_from!r} is not one of {DRAWS_FROM}")
        self.l2, self.draws, self.draws_from, self.pools, self.seed = l2, draws, draws_from, [int(k) for k in pools], seed
        self.fitted: FeatureSpaceAttack | None = None

    @classmethod
    def from_settings(cls, attack: Mapping) -> FeatureSpace | None:
        fs = attack["feature_space"]
        if not bool(fs["enabled"]):
            return None
        return cls(l2=float(fs["l2"]), draws=int(fs["draws"]), draws_from=str(fs["draws_from"]),
                   pools=[int(k) for k in attack["pool_rounds"]], seed=int(attack["seed"]))

    def applies(self, attacker: AttackerData, view: ServerView) -> bool:
        return bool(view.recovered)

    def fit_classifier(self, attacker: AttackerData, view: ServerView) -> FeatureSpaceAttack:
        """The gender classifier on emotion-conditional means, trained on the attacker's speakers."""
        # virtual clients draw on every row of the attacker's own clients (its validation rows are its data too);
        # re-sampled shards keep their training rows, as fed-ser's first version did
        rows = attacker.client >= 0 if self.draws_from == "speakers" else attacker.train
        sizes = view.sizes if len(view.updates) else np.array([view.local.batch_size])
        raw = None if attacker.X_raw is None else attacker.X_raw[rows]
        X, batch = attacker.X[rows], view.local.batch_size
        if view.local.algorithm == "fedavg":  # a FedAvg update carries every row of its client
            batch = 10**9
            if not reads_magnitude(view.local, int(np.median(sizes))):
                # several Adam steps leave only the samples' sign patterns (attacks.inference.unrolled): the
                # classifier learns on what the inversion returns, the signs of the attacker's own rows
                X, raw = SIGN_MAGNITUDE * np.sign(X), None
        return train_feature_space_attack(X, attacker.y[rows], attacker.client[rows],
                                          np.where(attacker.client_female, "F", "M"), batch_size=batch,
                                          pools=self.pools, draws=self.draws, l2=self.l2, seed=self.seed,
                                          speaker=attacker.row_speaker[rows], sizes=sizes, draws_from=self.draws_from, raw=raw)

    def fit(self, attacker: AttackerData, view: ServerView) -> None:
        self.fitted = self.fit_classifier(attacker, view)

    def score(self, view: ServerView) -> dict[str, Scores]:
        if self.fitted is None:
            raise RuntimeError("the feature-space attack is not fitted")
        recovered, clients = view.recovered, view.clients
        scores = np.array([self.fitted.p_female(r.inputs, r.labels) for r in recovered])
        adaptive = self.fitted.adapted(scores)  # needs no label: the server sees every client's update
        return {"feature-space": Scores(scores, clients, self.fitted.scorer(recovered)),
                "feature-space-adaptive": Scores(np.array([adaptive.p_female(r.inputs, r.labels) for r in recovered]),
                                                 clients, adaptive.scorer(recovered))}

    def describe(self) -> dict:
        return {} if self.fitted is None else {"training_statistics": self.fitted.history.get("training_statistics")}
