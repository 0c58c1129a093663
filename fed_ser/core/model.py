"""The paper's SER model: input -> 256 -> 128 -> 4, ReLU, dropout after the first dense layer."""

from __future__ import annotations

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``x``; ``keep`` is this batch's dropout multiplier (:func:`fed_ser.core.training.local_plan`
        draws it), else the dropout module draws its own (and is off in eval mode)."""
        h = torch.relu(self.dense1(x))
        h = self.dropout(h) if keep is None else h * keep
        h = torch.relu(self.dense2(h))
        return self.out(h)



def build_model(input_dim: int, dropout: float, seed: int) -> SERModel:
    """A freshly initialised model; the same seed gives the same weights everywhere."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = SERModel(input_dim, dropout)
    torch.random.set_rng_state(gen_state)
    return model
