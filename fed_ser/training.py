"""The one local training loop, shared by FedSGD, FedAvg, the shadow engine and the defences.

:func:`local_update` runs a client's local computation on its shard and returns what the client
would send: the gradient of one mini-batch (FedSGD) or its locally trained parameters after
``epochs`` passes (FedAvg), plus the number of local steps ``T`` that the attacker's
pseudo-gradient divides by. Defences plug into the same loop: ``batch_hook`` may replace a batch
(adversarial training) and ``make_optimizer`` may return a privacy-wrapped optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

BatchHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LocalResult:
    """What one client produced in one round."""

    arrays: dict[str, np.ndarray]  # gradients (FedSGD) or parameters (FedAvg)
    num_examples: int  # n_k: the client's training sample count (aggregation weight)
    steps: int  # T: local optimiser steps taken
    loss: float  # mean training loss over the local batches


ADAM = {"weight_decay": 1e-4, "betas": (0.9, 0.98), "eps": 1e-8}  # the paper's FedAvg client optimiser


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The clients' optimiser: ``sgd``, or ``adam`` as in the paper's FedAvg code."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **ADAM)
    raise ValueError(f"fl.optimizer: unknown {name!r}; expected 'sgd' or 'adam'")


def seed_client_rng(seed: int) -> None:
    """Seed the CPU generator that dropout draws from (cheaper than ``torch.manual_seed``, which
    also seeds every accelerator; local training runs on the CPU)."""
    torch.random.default_generator.manual_seed(seed)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def local_update(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    algorithm: str,
    batch_size: int = 20,
    lr: float = 5e-4,
    epochs: int = 1,
    optimizer: str = "adam",
    seed: int = 0,
    batch_hook: BatchHook | None = None,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> LocalResult:
    """Run one client's local computation; ``model`` holds the current global parameters."""
    if len(X) == 0:
        raise ValueError("local_update: the client's training shard is empty")
    if algorithm not in ("fedsgd", "fedavg"):
        raise ValueError(f"fl.algorithm: unknown {algorithm!r}; expected 'fedsgd' or 'fedavg'")
    rng = np.random.default_rng(seed)
    seed_client_rng(seed)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    opt = None
    if algorithm == "fedavg":
        opt = optimizer_factory(model) if optimizer_factory else make_optimizer(optimizer, model.parameters(), lr)
    model.zero_grad(set_to_none=True)
    losses: list[float] = []
    steps = 0
    for _ in range(epochs if algorithm == "fedavg" else 1):
        for idx in _batches(len(X), batch_size, rng):
            xb, yb = Xt[idx], yt[idx]
            if batch_hook is not None:
                xb, yb = batch_hook(model, xb, yb)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            losses.append(float(loss.detach()))
            steps += 1
            if algorithm == "fedsgd":
                break  # FedSGD: the gradient of one local batch is what the client shares
            opt.step()
    if algorithm == "fedsgd":
        arrays = {k: p.grad.detach().cpu().numpy().copy() for k, p in model.named_parameters()}
    else:
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return LocalResult(arrays=arrays, num_examples=len(X), steps=steps, loss=float(np.mean(losses)))


def unweighted_average_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 4) -> float:
    """UAR: the mean of per-class recalls over the classes present in ``y_true``."""
    recalls = [np.mean(y_pred[y_true == c] == c) for c in range(n_classes) if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, UAR and mean cross-entropy of ``model`` on ``(X, y)`` (eval mode)."""
    model.eval()
    logits = model(torch.as_tensor(X, dtype=torch.float32))
    yt = torch.as_tensor(y, dtype=torch.long)
    pred = logits.argmax(1).numpy()
    return {
        "acc": float(np.mean(pred == y)),
        "uar": unweighted_average_recall(np.asarray(y), pred),
        "loss": float(nn.functional.cross_entropy(logits, yt)),
    }
