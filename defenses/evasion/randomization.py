"""Test-time randomisation: the prediction is averaged over random transformations of the input.

Randomising the input at inference (Xie et al. 2018; the robustness paper's test stage) makes a
fixed perturbation less reliable. The transformations suit an utterance-level feature vector,
where a position is a feature, not a pixel (resizing would mix functionals):

- ``noise``: add N(0, strength^2) to every (z-normalised) feature;
- ``mask``: set a random share ``strength`` of the features to 0, the speaker's mean.

:class:`RandomizedModel` is differentiable, so an adaptive attacker can attack it through
expectation over transformation (``PerturbationConfig(eot_draws=...)``), which is how the
defence must be evaluated (a static attack on the bare model overstates it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TRANSFORMS = ("noise", "mask")


@dataclass(frozen=True)
class RandomizationConfig:
    transform: str = "noise"  # noise | mask
    strength: float = 0.5  # noise std, or the share of features masked
    draws: int = 8  # random transformations averaged per prediction

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"randomization.transform: {self.transform!r} is not one of {TRANSFORMS}")
        if not self.strength >= 0 or (self.transform == "mask" and self.strength >= 1):
            raise ValueError(f"randomization.strength: out of range for {self.transform}: {self.strength}")
        if self.draws < 1:
            raise ValueError(f"randomization.draws: must be >= 1, got {self.draws}")


def random_transform(x: torch.Tensor, cfg: RandomizationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random draw of the transformation (differentiable in ``x``)."""
    if cfg.transform == "noise":
        return x + cfg.strength * torch.randn(x.shape, generator=generator)
    keep = (torch.rand(x.shape, generator=generator) >= cfg.strength).to(x.dtype)
    return x * keep


class RandomizedModel(nn.Module):
    """``model`` behind test-time randomisation: log of the mean softmax over ``draws`` transforms.

    Returns log-probabilities, which ``argmax`` and ``cross_entropy`` treat as logits.
    """

    def __init__(self, model: nn.Module, cfg: RandomizationConfig, seed: int = 0):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(self.model(random_transform(x, self.cfg, self.generator)), -1)
                             for _ in range(self.cfg.draws)]).mean(0)
        return probs.clamp_min(1e-12).log()
