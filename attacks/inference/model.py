"""The attack model: a CNN per SER layer, then per-layer predictions fused by update size.

Per layer ``l``: the weight update ``W_l`` (out x in) as a one-channel image through three
convolution blocks (16, 32, 64 filters; max-pooling; ReLU; dropout: pooling first computes what
the published ReLU-then-pooling does, on a smaller map), flattened, concatenated
with the bias update ``b_l``, then an MLP (-> 256 -> 128 -> 2). The fused prediction is the
weighted average of the per-layer class probabilities with weights proportional to each layer's
number of weights (Emo-Base: 0.884 / 0.114 / 0.002).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _pools_for(shape: tuple[int, int], pools: list[int]) -> list[tuple[int, int]]:
    """Max-pool sizes per block, capped so small layers (e.g. 4 x 128) still fit."""
    h, w = shape
    out = []
    for p in pools:
        ph, pw = min(p, h), min(p, w)
        out.append((ph, pw))
        h, w = max(1, h // ph), max(1, w // pw)
    return out


class LayerAttack(nn.Module):
    """CNN over one layer's weight update plus its bias update -> gender logits."""

    def __init__(self, weight_shape: tuple[int, int], bias_dim: int, channels=(16, 32, 64), kernel: int = 5,
                 pools=(2, 4, 8), dropout: float = 0.2, first_stride: int = 1):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 1
        stride = max(1, min(first_stride, *weight_shape))
        shape = (-(-weight_shape[0] // stride), -(-weight_shape[1] // stride))
        for i, (c, pool) in enumerate(zip(channels, _pools_for(shape, list(pools)))):
            blocks += [nn.Conv2d(c_in, c, kernel, padding=kernel // 2, stride=stride if i == 0 else 1)]
            if i == len(channels) - 1:
                blocks += [nn.BatchNorm2d(c)]
            # max-pooling before the ReLU computes the same (both are monotone) on a map pool-size times
            # smaller; a 1 x 1 pool is the identity: skipped, it cost a full pass over the largest feature map
            blocks += [nn.MaxPool2d(pool, ceil_mode=True) if pool != (1, 1) else nn.Identity(), nn.ReLU(inplace=True), nn.Dropout2d(dropout)]
            c_in = c
        self.cnn = nn.Sequential(*blocks)
        with torch.no_grad():
            flat = self.cnn(torch.zeros(1, 1, *weight_shape)).numel()
        self.head = nn.Sequential(
            nn.Linear(flat + bias_dim, 256), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 2),
        )

    def forward(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.cnn(w).flatten(1), b], dim=1))


class AttackModel(nn.Module):
    """One :class:`LayerAttack` per SER layer and their size-weighted fusion."""

    def __init__(self, shapes: dict[str, tuple[int, int]], **layer_kwargs):
        super().__init__()
        self.compute_dtype = torch.float32  # bfloat16 when trained under bf16 autocast (attacks.inference.train)
        self.layers = list(shapes)
        self.branches = nn.ModuleDict({l: LayerAttack(shapes[l], shapes[l][0], **layer_kwargs) for l in self.layers})
        sizes = torch.tensor([math.prod(shapes[l]) for l in self.layers], dtype=torch.float32)
        self.register_buffer("fusion_weights", sizes / sizes.sum())

    def forward(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-layer logits, keyed by layer name."""
        return {l: self.branches[l](*batch[l]) for l in self.layers}

    def fuse(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """P(female) of the weighted fusion of per-layer probabilities."""
        probs = torch.stack([torch.softmax(logits[l], dim=1)[:, 1] for l in self.layers], dim=1)
        return probs @ self.fusion_weights
