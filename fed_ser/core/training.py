"""A client's local work in one round, one description for every path that trains.

:func:`local_plan` says what a client does: which rows each optimiser step sees (FedSGD: one
batch; FedAvg: ``epochs`` shuffled passes) and the dropout mask of each step, drawn from the
client's seed. :func:`local_update` carries the plan out on the SER model (the Flower ClientApp
and the in-process engine, through :func:`fed_ser.run.client.client_update`); the vectorised engine
(:mod:`fed_ser.engines.vectorized`) carries the same plan out for a round's clients at once with
the same forward pass (:meth:`fed_ser.core.model.SERModel.forward` under ``torch.func``) and the
same optimiser (:func:`make_optimizer`). Both return what the client would send: the gradient of
one mini-batch (FedSGD) or its locally trained parameters (FedAvg), plus the number of local steps
``T`` that the attacker's pseudo-gradient divides by. Defences plug into :func:`local_update`:
``batch_hook`` may replace a batch (adversarial training) and ``dp_sgd`` makes the gradient
sample-level DP (a Poisson batch, :func:`poisson_rows`); :func:`fed_ser.run.client.client_update`
chooses them from the run's settings.

The core imports no defence: each is handed in (``batch_hook``, ``dp_sgd``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fed_ser.core.model import SERModel

#: Replaces a batch (adversarial training) before the forward pass; it keeps the batch's rows (the plan's
#: dropout mask is drawn for them).
BatchHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class PrivateStep(Protocol):
    """Sample-level DP for a FedSGD step, plugged into :func:`local_update` by the defence that provides it.

    ``hooks(model)`` is a context (per-sample gradient hooks on ``model``) that yields ``finish(rows)``:
    called after the backward pass of a batch of ``rows`` rows (or with 0 for an empty Poisson sample,
    without one), it leaves the private gradient in each parameter's ``.grad``, divided by
    ``expected_batch_size`` (``min(b, n)``, the Poisson batch's expected size).
    """

    expected_batch_size: int

    def hooks(self, model: nn.Module) -> AbstractContextManager[Callable[[int], None]]: ...


@dataclass
class LocalResult:
    """What one client produced in one round."""

    arrays: dict[str, np.ndarray]  # gradients (FedSGD) or parameters (FedAvg)
    num_examples: int  # n_k: the client's training sample count (aggregation weight)
    steps: int  # T: local optimiser steps taken
    loss: float  # mean training loss over the local batches
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. the DP noise multiplier used


ADAM = {"weight_decay": 1e-4, "betas": (0.9, 0.98), "eps": 1e-8}  # the paper's FedAvg client optimiser


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The clients' optimiser: ``sgd``, or ``adam`` as in the paper's FedAvg code."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **ADAM)
    raise ValueError(f"fl.optimizer: unknown {name!r}; expected 'sgd' or 'adam'")


def seed_client_rng(seed: int) -> None:
    """Seed the CPU generator that dropout masks are drawn from (cheaper than ``torch.manual_seed``,
    which also seeds every accelerator; local training runs on the CPU)."""
    torch.random.default_generator.manual_seed(seed)


@dataclass(frozen=True)
class LocalStep:
    """One optimiser step of a client: the rows of its batch and their dropout multiplier."""

    rows: np.ndarray  # indices into the client's training shard
    keep: torch.Tensor | None  # (len(rows), hidden) multiplier after the first dense layer; None: no dropout


def dropout_multiplier(n: int, width: int, p: float) -> torch.Tensor | None:
    """The mask ``nn.Dropout(p)`` would draw next from torch's CPU generator for an ``(n, width)`` input.

    CPU dropout draws ``bernoulli(1 - p)`` over the input's shape and scales by ``1 / (1 - p)``, so
    a forward pass given this multiplier computes what ``nn.Dropout`` would (a test checks it).
    """
    if p == 0.0:
        return None
    return torch.empty(n, width).bernoulli_(1.0 - p).div_(1.0 - p)


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Probability ``q = min(b, n) / n`` that one of a client's ``n`` rows is in its Poisson batch."""
    return min(batch_size, num_examples) / num_examples


def poisson_rows(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one Poisson sample: each of ``n`` rows with probability :func:`sample_rate`
    (DP-FedSGD's batch, as Opacus' ``DPDataLoader`` draws it and its accountant assumes)."""
    return np.flatnonzero(rng.random(n) < sample_rate(batch_size, n))


def local_plan(n: int, *, algorithm: str, batch_size: int, epochs: int, seed: int, hidden: int, dropout: float,
               poisson: bool = False) -> list[LocalStep]:
    """Every local step of a client with ``n`` training rows in one round.

    FedSGD takes one batch (the first ``batch_size`` rows of a permutation, or a Poisson sample when
    ``poisson``); FedAvg makes ``epochs`` passes, each over a fresh permutation in batches of
    ``batch_size`` (the last one shorter). The order comes from ``numpy.random.default_rng(seed)``
    and the dropout masks from torch's CPU generator seeded with ``seed``, one per step in step
    order: so one seed gives the same batches and masks on every path that trains.
    """
    if algorithm not in ("fedsgd", "fedavg"):
        raise ValueError(f"fl.algorithm: unknown {algorithm!r}; expected 'fedsgd' or 'fedavg'")
    rng = np.random.default_rng(seed)
    seed_client_rng(seed)
    if poisson:
        if algorithm != "fedsgd":
            raise ValueError("a Poisson batch (DP-FedSGD) applies to fl.algorithm=fedsgd only")
        batches = [poisson_rows(n, batch_size, rng)]
    else:
        batches = []
        for _ in range(epochs if algorithm == "fedavg" else 1):
            order = rng.permutation(n)
            batches += [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if algorithm == "fedsgd":
            batches = batches[:1]
    return [LocalStep(rows, dropout_multiplier(len(rows), hidden, dropout)) for rows in batches]


def local_update(
    model: SERModel,
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
    dp_sgd: PrivateStep | None = None,
) -> LocalResult:
    """Run one client's local computation; ``model`` holds the current global parameters.

    The steps are :func:`local_plan`'s for ``seed``. ``dp_sgd`` makes the FedSGD gradient
    sample-level DP on a Poisson sample of the rows (:class:`PrivateStep`; DP-FedSGD with Opacus is
    :class:`defenses.privacy.dp_fedsgd.PrivateGradient`).
    """
    if len(X) == 0:
        raise ValueError("local_update: the client's training shard is empty")
    if dp_sgd is not None and dp_sgd.expected_batch_size != min(batch_size, len(X)):
        raise ValueError(f"local_update: the DP step divides by {dp_sgd.expected_batch_size} rows, the Poisson batch "
                         f"expects min(batch_size, n) = {min(batch_size, len(X))}")
    plan = local_plan(len(X), algorithm=algorithm, batch_size=batch_size, epochs=epochs, seed=seed,
                      hidden=model.dense1.out_features, dropout=model.dropout.p, poisson=dp_sgd is not None)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr) if algorithm == "fedavg" else None
    model.zero_grad(set_to_none=True)
    losses: list[float] = []
    metrics: dict[str, float] = {}
    with dp_sgd.hooks(model) if dp_sgd is not None else nullcontext(None) as finish:
        for step in plan:
            if finish is not None:
                metrics["dp-batch"] = len(step.rows)
                if len(step.rows) == 0:  # an empty Poisson sample: the client sends the noise alone
                    finish(0)
                    losses = [float("nan")]
                    break
            xb, yb = Xt[step.rows], yt[step.rows]
            if batch_hook is not None:
                xb, yb = batch_hook(model, xb, yb)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb, step.keep), yb)
            loss.backward()
            losses.append(float(loss.detach()))
            if opt is not None:
                opt.step()
            elif finish is not None:
                finish(len(step.rows))
    if algorithm == "fedsgd":
        arrays = {k: p.grad.detach().cpu().numpy().copy() for k, p in model.named_parameters()}
    else:
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return LocalResult(arrays=arrays, num_examples=len(X), steps=len(plan), loss=float(np.nanmean(losses) if
                       np.isfinite(losses).any() else np.nan), metrics=metrics)
