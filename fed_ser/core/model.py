"""The paper's SER model: input -> 256 -> 128 -> 4, ReLU, dropout after the first dense layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F


class SERModel(nn.Module):
    """Multi-layer perceptron over one utterance-level feature vector.

    Layer names (``dense1``, ``dense2``, ``out``) are the names the recorder and the attack use
    for the first, second and last layer. Unlike the paper's published code, the dropout is a
    module, so ``model.eval()`` really switches it off.
    """

    def __init__(self, input_dim: int, dropout: float = 0.2, hidden: tuple[int, int] = (256, 128), n_classes: int = 4):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        self.dense1 = nn.Linear(input_dim, hidden[0])
        self.dropout = nn.Dropout(dropout)
        self.dense2 = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.dense1(x)))
        h = torch.relu(self.dense2(h))
        return self.out(h)


LAYERS = ("dense1", "dense2", "out")


def dropout_multiplier(n: int, width: int, p: float) -> torch.Tensor | None:
    """The mask ``nn.Dropout(p)`` would draw next from torch's global RNG for an ``(n, width)`` input.

    CPU dropout draws ``bernoulli(1 - p)`` over the input's shape and scales by ``1 / (1 - p)``;
    drawing it here after the same ``torch.manual_seed`` gives the same mask, which is how the
    vectorised engine reproduces the per-client loop exactly (a test checks it).
    """
    if p == 0.0:
        return None
    return torch.empty(n, width).bernoulli_(1.0 - p).div_(1.0 - p)


def functional_forward(params: Mapping[str, torch.Tensor], x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """:meth:`SERModel.forward` with explicit parameters and an explicit dropout multiplier.

    For ``torch.func`` (per-client gradients under ``vmap``); ``keep=None`` is evaluation mode.
    """
    h = torch.relu(F.linear(x, params["dense1.weight"], params["dense1.bias"]))
    if keep is not None:
        h = h * keep
    h = torch.relu(F.linear(h, params["dense2.weight"], params["dense2.bias"]))
    return F.linear(h, params["out.weight"], params["out.bias"])


def build_model(input_dim: int, dropout: float, seed: int) -> SERModel:
    """A freshly initialised model; the same seed gives the same weights everywhere."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = SERModel(input_dim, dropout)
    torch.random.set_rng_state(gen_state)
    return model
