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
   federated training needed), simulated the same way (random batches of the protocol's size,
   k of them pooled), predicts gender.

What the attacker knows: the architecture, the batch size and dropout rate (the paper's
white-box attacker), the global model of each round (it sent it), and its own shadow speakers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from attacks.inference.inversion import Recovered


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

    def p_female(self, X: np.ndarray, y: np.ndarray) -> float:
        """P(female) of a client whose recovered utterances are ``X`` with emotions ``y``."""
        if len(X) == 0:
            return self.prior
        return float(self.model.predict_proba(emotion_means(X, y, self.n_classes)[None])[0, 1])

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


def train_feature_space_attack(X: np.ndarray, y: np.ndarray, client: np.ndarray, gender: np.ndarray, *,
                               batch_size: int, pools: list[int], draws: int = 20, l2: float = 0.01,
                               seed: int = 0, n_classes: int = 4) -> FeatureSpaceAttack:
    """Fit the classifier on the attacker's speakers: rows ``X`` (normalised features), emotions
    ``y``, their ``client`` index and each client's ``gender`` ("F"/"M")."""
    if len(set(gender[np.unique(client)].tolist())) < 2:
        raise ValueError("the attacker's data hold one gender only")
    if not np.isfinite(X).all():
        raise ValueError("the attacker's features contain NaN/inf")
    if l2 <= 0:
        raise ValueError(f"attack.feature_space.l2 must be > 0, got {l2}")
    rng = np.random.default_rng(seed)
    F, L = simulated_statistics(X, y, client, gender, batch_size, sorted({1, *pools}), draws, rng, n_classes)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=l2, max_iter=5000)).fit(F, L)
    return FeatureSpaceAttack(model, X.shape[1], n_classes, history={"training_statistics": len(F)})
