"""Federated adversarial training: clients train on a mix of clean and adversarial examples.

The robustness paper (Chang et al. 2022) protects the model, not only the data: every client
replaces part of each local batch by adversarial versions crafted on the fly against the current
global model (the parameters it received this round, frozen for the round), and trains on the
mixed batch inside the one shared loop (:func:`fed_ser.core.training.local_update`'s ``batch_hook``).
The batch keeps its size, so FedSGD's batch and DP-FedSGD's sample rate are unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from attacks.evasion.adversarial import PerturbationConfig, perturb


@dataclass(frozen=True)
class AdversarialTrainingConfig:
    """``mix``: share of each local batch replaced by adversarial examples (0 disables)."""

    mix: float = 0.5
    attack: PerturbationConfig = field(default_factory=lambda: PerturbationConfig("pgd", "linf", 0.1, 5))

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"adv.mix: must be in [0, 1], got {self.mix}")


class AdversarialBatches:
    """A ``batch_hook``: the first ``round(mix * b)`` examples of each batch made adversarial.

    ``global_model`` is copied and frozen in eval mode when the hook is built (the start of the
    client's round), so examples are crafted against the global model even while FedAvg's local
    model moves. Random starts draw from a generator seeded by the client's round seed.
    """

    def __init__(self, global_model: nn.Module, cfg: AdversarialTrainingConfig, seed: int):
        self.cfg = cfg
        self.reference = copy.deepcopy(global_model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(round(self.cfg.mix * len(x)))
        if k == 0:
            return x, y
        x = x.clone()
        x[:k] = perturb(self.reference, x[:k], y[:k], self.cfg.attack, self.generator)
        return x, y
