"""The paper's attack as an :class:`~attacks.inference.base.Attack`: a per-layer CNN with weighted
fusion, trained on the shadow federations' updates labelled with their clients' genders.

Feng et al., *Attribute Inference Attack of Speech Emotion Recognition in Federated Learning
Settings* (2021), Section 4: each SER layer's weight update is read as a one-channel image by its
own CNN (:mod:`attacks.inference.model`), the layers' outputs are fused with weights proportional to each layer's update size, and
the whole is trained on shadow updates (:func:`attacks.inference.train.train_attack`). Besides the
fused score it reports each layer alone (``cnn@<layer>``: the paper's per-layer analysis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from attacks.inference.base import AttackerData, ServerView
from attacks.inference.data import UpdateDataset
from attacks.inference.evaluate import Scores
from attacks.inference.settings import AttackSettings
from attacks.inference.train import AttackConfig, TrainedAttack, predict, train_attack


def attack_config(a: Mapping) -> AttackConfig:
    """The CNN's hyper-parameters from the ``attack`` settings (conf/attack/): the :class:`AttackConfig`
    part of their declaration, :class:`~attacks.inference.settings.AttackSettings`."""
    return AttackSettings.from_mapping(a).cnn()


class PaperCNN:
    """The paper's per-layer CNN with fusion (see the module docstring)."""

    name: ClassVar[str] = "cnn"
    fit_reads_view: ClassVar[bool] = False
    costly: ClassVar[bool] = True
    labels: ClassVar[dict[str, str]] = {"cnn": "paper's CNN (fused)"}

    def __init__(self, config: AttackConfig, progress: bool = True):
        self.config, self.progress = config, progress
        self.trained: TrainedAttack | None = None

    @classmethod
    def from_settings(cls, attack: Mapping) -> PaperCNN:
        return cls(attack_config(attack))

    def applies(self, attacker: AttackerData, view: ServerView) -> bool:
        # trained on the shadow updates: both genders must be among them (a short run may sample one only)
        return (attacker.store is not None and len(set(attacker.update_labels.tolist())) == 2
                and view.store is not None and bool(view.updates))

    def fit(self, attacker: AttackerData, view: ServerView) -> None:
        print(f"[attack] CNN on {len(attacker.updates)} shadow updates, layers {self.config.layers}", flush=True)
        self.trained = train_attack(attacker.store, attacker.updates, attacker.update_labels, self.config, progress=self.progress)

    def score(self, view: ServerView) -> dict[str, Scores]:
        if self.trained is None:
            raise RuntimeError("the CNN attack is not fitted")
        unlabelled = np.zeros(len(view.updates), dtype=np.int64)  # the dataset wants labels; the score never sees any
        fused, per_layer = predict(self.trained.model, UpdateDataset(view.store, view.updates, unlabelled,
                                                                     self.config.layers, self.trained.stats))
        clients = view.clients
        return {"cnn": Scores(fused, clients), **{f"cnn@{l}": Scores(p, clients) for l, p in per_layer.items()}}

    def describe(self) -> dict:
        if self.trained is None:
            return {}
        return {"fusion_weights": dict(zip(self.config.layers, self.trained.model.fusion_weights.tolist())),
                "history": self.trained.history}
