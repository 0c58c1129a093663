"""A client's local work in one round, one description for every path that trains.

:func:`local_plan` says what a client does: which rows each optimiser step sees (FedSGD: one
batch; FedAvg: ``epochs`` shuffled passes) and the dropout mask of each step, drawn from the
client's seed. :func:`local_update` carries the plan out on an ``nn.Module`` (the Flower ClientApp
and the in-process engine, through :func:`client_update`); the vectorised engine
(:mod:`fed_ser.engines.vectorized`) carries the same plan out for a round's clients at once with
the same forward pass (:meth:`fed_ser.core.model.SERModel.forward` under ``torch.func``) and the
same optimiser (:func:`make_optimizer`). Both return what the client would send: the gradient of
one mini-batch (FedSGD) or its locally trained parameters (FedAvg), plus the number of local steps
``T`` that the attacker's pseudo-gradient divides by. Defences plug into :func:`local_update`:
``batch_hook`` may replace a batch (adversarial training) and ``dp_sgd`` makes the gradient
sample-level DP (a Poisson batch, :func:`poisson_rows`).

The defence mechanisms (:mod:`defenses`) are imported when a run uses them: Opacus alone takes
about a second to import, which every ClientApp process would pay.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from fed_ser.core.settings import RunSettings

BatchHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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


def poisson_rows(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one Poisson sample: each of ``n`` rows with probability ``min(b, n) / n``
    (DP-FedSGD's batch, as Opacus' ``DPDataLoader`` draws it and its accountant assumes)."""
    return np.flatnonzero(rng.random(n) < min(batch_size, n) / n)


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
    dp_sgd: tuple[float, float] | None = None,
) -> LocalResult:
    """Run one client's local computation; ``model`` holds the current global parameters.

    The steps are :func:`local_plan`'s for ``seed``. ``dp_sgd=(noise_multiplier, clip)`` makes the
    FedSGD gradient sample-level DP (Opacus: per-sample clipping, Gaussian noise, on a Poisson sample
    of the rows; see :mod:`defenses.privacy.dp_fedsgd`).
    """
    if len(X) == 0:
        raise ValueError("local_update: the client's training shard is empty")
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
    if dp_sgd is not None:
        from defenses.privacy.dp_fedsgd import private_gradients

        private = private_gradients(model, dp_sgd[0], dp_sgd[1], min(batch_size, len(X)))
    else:
        private = nullcontext(None)
    with private as dp_opt:
        for step in plan:
            if dp_opt is not None:
                metrics["dp-batch"] = len(step.rows)
                if len(step.rows) == 0:  # an empty Poisson sample: the client sends the noise alone
                    for p in model.parameters():
                        p.summed_grad = torch.zeros_like(p)
                    dp_opt.add_noise()
                    for p in model.parameters():
                        p.grad /= dp_opt.expected_batch_size
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
            elif dp_opt is not None:
                dp_opt.pre_step()  # clip per-sample gradients, add noise, average: into p.grad
    if algorithm == "fedsgd":
        arrays = {k: p.grad.detach().cpu().numpy().copy() for k, p in model.named_parameters()}
    else:
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return LocalResult(arrays=arrays, num_examples=len(X), steps=len(plan), loss=float(np.nanmean(losses) if
                       np.isfinite(losses).any() else np.nan), metrics=metrics)


def client_update(model: nn.Module, X: np.ndarray, y: np.ndarray, s: RunSettings, seed: int, *,
                  client: int, num_clients: int) -> LocalResult:
    """What one client sends in one round under run settings ``s``, defences included.

    The single entry point of the Flower ClientApp and the in-process engine: plain FedSGD /
    FedAvg, DP-FedSGD (``dp.mode=sample``), user-level DP (``dp.mode=user``), UDP as published
    (``dp.mode=udp``) and federated adversarial training (``adv.mix > 0``, examples crafted against
    the received global model). ``client`` (its id) and ``num_clients`` place the client in the shared schedule
    (the DP calibration): ``num_clients`` is :func:`fed_ser.core.schedule.federation_size`.
    """
    privacy = s.privacy()
    hook = None
    adv = s.adversarial_training()
    if adv is not None:
        from defenses.evasion.adversarial_training import AdversarialBatches

        hook = AdversarialBatches(model, adv, seed + 2)
    dp_sgd, metrics = None, {}
    if s.dp_mode == "sample":
        from defenses.privacy.dp_fedsgd import noise_multiplier, sample_rate
        from defenses.privacy.report import dp_steps

        q = sample_rate(s.batch_size, len(X))
        sigma = noise_multiplier(privacy, q, dp_steps(s, client, num_clients))
        dp_sgd, metrics = (sigma, privacy.clip), {"dp-noise-multiplier": sigma, "dp-sample-rate": q}
    old = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()} if s.dp_mode in ("user", "udp") else None
    r = local_update(model, X, y, algorithm=s.algorithm, batch_size=s.batch_size, lr=s.lr, epochs=s.local_epochs,
                     optimizer=s.optimizer, seed=seed, dp_sgd=dp_sgd, batch_hook=hook)
    if s.dp_mode == "user":
        from defenses.privacy.report import dp_steps
        from defenses.privacy.user_dp import privatize, server_noise_multiplier

        sigma = server_noise_multiplier(privacy, dp_steps(s, client, num_clients))
        r.arrays = privatize(r.arrays, old, privacy.clip, sigma, np.random.default_rng(seed + 1))
        metrics = {"dp-noise-multiplier": sigma}
    elif s.dp_mode == "udp":
        from defenses.privacy.udp import privatize_update, udp_sigma

        sigma = udp_sigma(privacy, len(X), s.fraction, s.rounds)
        r.arrays = privatize_update(r.arrays, old, privacy, sigma, np.random.default_rng(seed + 1))
        metrics = {"dp-sigma": sigma}
    r.metrics = {**r.metrics, **metrics}
    return r
