"""The input-profile attack: a noise-aware linear attack on one dense layer's update.

Why a second attack beside the paper's CNN: under DP-FedSGD every element of a first-layer
update carries Gaussian noise of std ``sigma * clip / b`` while the clipped signal is spread over
all ``out x in`` elements (256 x 988 for Emo-Base), so elementwise the update is mostly noise
even at epsilon 1000 and the per-element CNN falls to chance. The signal is not spread at random,
though: a dense layer's weight gradient is ``sum_i delta_i x_i^T`` (rank <= batch size), so
summing it over the ``out`` output units gives ``sum_i (1^T delta_i) x_i``, a weighted sum of
the client's *input features*, in which the signal adds up coherently while the independent
noise grows only with ``sqrt(out)``. That ``in``-long **input profile** is what this attack
reads: standardised with the shadow profiles' statistics, then an L2-regularised logistic
regression on gender. Pooling k rounds averages the k profiles *before* predicting, which
averages the DP noise away (std / sqrt(k)): the attacker who keeps listening.

An auditor reports both: the paper's CNN (all layers, elementwise) and this profile attack
(the strongest cheap attacker we know of under noise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from sklearn.linear_model import LogisticRegression

from attacks.inference.base import AttackerData, ServerView
from attacks.inference.evaluate import NotFinite, Scores, client_success
from fed_ser.recording.store import UpdateInfo, UpdateStore


def input_profile(weight_update: np.ndarray) -> np.ndarray:
    """Sum of a dense layer's ``(out, in)`` weight update over its output units: an ``in`` vector."""
    if weight_update.ndim != 2:
        raise ValueError(f"input_profile needs a 2-D dense weight update, got shape {weight_update.shape}")
    return weight_update.sum(axis=0, dtype=np.float64)


def update_profiles(store: UpdateStore, updates: list[UpdateInfo], layer: str = "dense1") -> np.ndarray:
    """``(len(updates), in)`` input profiles of ``layer``, read one update at a time from ``store``.

    Memory is ``in`` floats per update (4 KB for Emo-Base), not the whole update.
    """
    key = f"{layer}.weight"
    if updates and key not in updates[0].layers:
        raise KeyError(f"attack.profile.layer: {layer!r} is not a recorded layer ({sorted(updates[0].layers)})")
    out = [input_profile(store.attack_input(u, [key])[key]) for u in updates]
    if not out:
        raise ValueError("no updates to build input profiles from")
    return np.stack(out).astype(np.float32)


@dataclass
class ProfileAttack:
    """A fitted profile attack: shadow standardisation + logistic regression (label 1 = female)."""

    layer: str
    mean: np.ndarray
    std: np.ndarray
    clf: LogisticRegression

    def p_female(self, profiles: np.ndarray) -> np.ndarray:
        """P(female) for each row of ``profiles``."""
        if not np.isfinite(profiles).all():
            raise NotFinite("input profiles of the attacked updates contain NaN/inf: the recorded updates are not finite "
                            "(the training diverged)")
        return self.clf.predict_proba((profiles - self.mean) / self.std)[:, 1]


def train_profile_attack(profiles: np.ndarray, labels: np.ndarray, layer: str = "dense1",
                         l2: float = 0.01) -> ProfileAttack:
    """Fit on shadow profiles; ``l2`` is the inverse regularisation strength (sklearn's ``C``)."""
    if len(profiles) != len(labels):
        raise ValueError("one label per shadow profile is required")
    if len(set(np.asarray(labels).tolist())) < 2:
        raise ValueError("attack training data holds one gender only")
    if not np.isfinite(profiles).all():
        raise NotFinite("shadow input profiles contain NaN/inf: the shadow federation's recorded updates are not finite "
                         "(its training diverged, e.g. on un-normalised features)")
    if l2 <= 0:
        raise ValueError(f"attack.profile.l2 must be > 0, got {l2}")
    mean, std = profiles.mean(0), profiles.std(0) + 1e-12
    clf = LogisticRegression(C=l2, max_iter=5000).fit((profiles - mean) / std, labels)
    return ProfileAttack(layer, mean, std, clf)


def pooled_scorer(attack: ProfileAttack, profiles: np.ndarray):
    """``score_of(indices)`` for :mod:`attacks.inference.evaluate`: k pooled rounds average their input
    profiles before the prediction (which averages DP noise away)."""
    return lambda idx: float(attack.p_female(profiles[idx].mean(0, keepdims=True))[0])


def profile_asr(attack: ProfileAttack, profiles: np.ndarray, clients: np.ndarray, labels: np.ndarray,
                trials: int = 10, pool_rounds: int = 1, seed: int = 0) -> float:
    """ASR as in :func:`attacks.inference.evaluate.attack_success_rate`, pooling k rounds by averaging the
    k input profiles of a trial before the prediction."""
    success = client_success(pooled_scorer(attack, profiles), clients, labels, trials, pool_rounds, seed)
    return float(np.mean(list(success.values()))) if success else float("nan")


class InputProfile:
    """The input-profile attack as an :class:`~attacks.inference.base.Attack` (``attack.profile``)."""

    name: ClassVar[str] = "profile"
    fit_reads_view: ClassVar[bool] = False
    costly: ClassVar[bool] = False
    labels: ClassVar[dict[str, str]] = {"profile": "input profile"}

    def __init__(self, layer: str = "dense1", l2: float = 0.01):
        self.layer, self.l2 = layer, l2
        self.fitted: ProfileAttack | None = None

    @classmethod
    def from_settings(cls, attack: Mapping) -> InputProfile | None:
        p = attack["profile"]
        return cls(str(p["layer"]), float(p["l2"])) if bool(p["enabled"]) else None

    def applies(self, attacker: AttackerData, view: ServerView) -> bool:
        # trained on the shadow updates: both genders must be among them (a short run may sample one only)
        return (attacker.store is not None and len(set(attacker.update_labels.tolist())) == 2
                and view.store is not None and bool(view.updates))

    def fit(self, attacker: AttackerData, view: ServerView) -> None:
        self.fitted = train_profile_attack(update_profiles(attacker.store, attacker.updates, self.layer),
                                           attacker.update_labels, self.layer, self.l2)

    def score(self, view: ServerView) -> dict[str, Scores]:
        if self.fitted is None:
            raise RuntimeError("the profile attack is not fitted")
        profiles = update_profiles(view.store, view.updates, self.layer)
        return {"profile": Scores(self.fitted.p_female(profiles), view.clients, pooled_scorer(self.fitted, profiles))}

    def describe(self) -> dict:
        return {}
