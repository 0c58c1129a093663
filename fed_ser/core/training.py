"""The one local training loop, shared by FedSGD, FedAvg, the shadow engine and the defences.

:func:`local_update` runs a client's local computation on its shard and returns what the client
would send: the gradient of one mini-batch (FedSGD) or its locally trained parameters after
``epochs`` passes (FedAvg), plus the number of local steps ``T`` that the attacker's
pseudo-gradient divides by. Defences plug into the same loop: ``batch_hook`` may replace a batch
(adversarial training) and ``make_optimizer`` may return a privacy-wrapped optimizer.

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
    dp_sgd: tuple[float, float] | None = None,
) -> LocalResult:
    """Run one client's local computation; ``model`` holds the current global parameters.

    ``dp_sgd=(noise_multiplier, clip)`` makes the FedSGD gradient sample-level DP (Opacus:
    per-sample clipping, Gaussian noise, on a Poisson sample of the rows; see :mod:`defenses.privacy.dp_fedsgd`).
    """
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
    if dp_sgd is not None and algorithm != "fedsgd":
        raise ValueError("dp_sgd (DP-FedSGD) applies to fl.algorithm=fedsgd only")
    model.zero_grad(set_to_none=True)
    losses: list[float] = []
    steps = 0
    metrics: dict[str, float] = {}
    if dp_sgd is not None:
        from defenses.privacy.dp_fedsgd import poisson_batch, private_gradients

        batches = lambda: iter([poisson_batch(len(X), batch_size, rng)])
        private = private_gradients(model, dp_sgd[0], dp_sgd[1], min(batch_size, len(X)))
    else:
        batches = lambda: _batches(len(X), batch_size, rng)
        private = nullcontext(None)
    with private as dp_opt:
        for _ in range(epochs if algorithm == "fedavg" else 1):
            for idx in batches():
                if dp_opt is not None:
                    metrics["dp-batch"] = len(idx)
                    if len(idx) == 0:  # an empty Poisson sample: the client sends the noise alone
                        for p in model.parameters():
                            p.summed_grad = torch.zeros_like(p)
                        dp_opt.add_noise()
                        for p in model.parameters():
                            p.grad /= dp_opt.expected_batch_size
                        steps, losses = 1, [float("nan")]
                        break
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
                    if dp_opt is not None:
                        dp_opt.pre_step()  # clip per-sample gradients, add noise, average: into p.grad
                    break  # FedSGD: the gradient of one local batch is what the client shares
                opt.step()
    if algorithm == "fedsgd":
        arrays = {k: p.grad.detach().cpu().numpy().copy() for k, p in model.named_parameters()}
    else:
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return LocalResult(arrays=arrays, num_examples=len(X), steps=steps, loss=float(np.nanmean(losses) if
                       np.isfinite(losses).any() else np.nan), metrics=metrics)


def client_update(model: nn.Module, X: np.ndarray, y: np.ndarray, s: RunSettings, seed: int, *,
                  pid: int, num_clients: int) -> LocalResult:
    """What one client sends in one round under run settings ``s``, defences included.

    The single entry point of the Flower ClientApp and the in-process engine: plain FedSGD /
    FedAvg, DP-FedSGD (``dp.mode=sample``), user-level DP (``dp.mode=user``), UDP as published
    (``dp.mode=udp``) and federated adversarial training (``adv.mix > 0``, examples crafted against
    the received global model). ``pid`` and ``num_clients`` place the client in the shared schedule
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
        sigma = noise_multiplier(privacy, q, dp_steps(s, pid, num_clients))
        dp_sgd, metrics = (sigma, privacy.clip), {"dp-noise-multiplier": sigma, "dp-sample-rate": q}
    old = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()} if s.dp_mode in ("user", "udp") else None
    r = local_update(model, X, y, algorithm=s.algorithm, batch_size=s.batch_size, lr=s.lr, epochs=s.local_epochs,
                     optimizer=s.optimizer, seed=seed, dp_sgd=dp_sgd, batch_hook=hook)
    if s.dp_mode == "user":
        from defenses.privacy.report import dp_steps
        from defenses.privacy.user_dp import privatize, server_noise_multiplier

        sigma = server_noise_multiplier(privacy, dp_steps(s, pid, num_clients))
        r.arrays = privatize(r.arrays, old, privacy.clip, sigma, np.random.default_rng(seed + 1))
        metrics = {"dp-noise-multiplier": sigma}
    elif s.dp_mode == "udp":
        from defenses.privacy.udp import privatize_update, udp_sigma

        sigma = udp_sigma(privacy, len(X), s.fraction, s.rounds)
        r.arrays = privatize_update(r.arrays, old, privacy, sigma, np.random.default_rng(seed + 1))
        metrics = {"dp-sigma": sigma}
    r.metrics = {**r.metrics, **metrics}
    return r
