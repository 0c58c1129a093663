"""DP-FedSGD: per-sample clipping and Gaussian noise on each client's gradient, with Opacus.

A FedSGD client shares the gradient of one mini-batch of ``b`` rows drawn from its ``n`` rows.
Under sample-level DP that gradient is computed with Opacus' ``GradSampleModule`` (per-sample
gradients) and ``DPOptimizer.pre_step`` (clip each per-sample gradient to ``clip``, sum, add
``N(0, (noise_multiplier * clip)^2)``, divide by ``b``), inside the shared local loop.

Accounting per client, with Opacus' RDP accountant: one step per round the client takes part
in, sample rate ``q = b / n``. The noise multiplier is calibrated so that a given number of
steps spends ``epsilon`` at ``delta``; the caller chooses that number (fed_ser passes each
client's scheduled participations, ``dp.calibrate=per_client``, or the expected
``rounds * fraction``, :func:`planned_steps`). The epsilon *spent* is computed afterwards from
the participations that happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from defenses import check_privacy_parameters


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP for FedSGD: target ``epsilon`` at ``delta``, per-sample clipping norm ``clip``."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0

    def __post_init__(self) -> None:
        check_privacy_parameters(self.epsilon, self.delta, self.clip)


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Probability that one of the client's rows is in its FedSGD batch."""
    return min(batch_size, num_examples) / num_examples


def planned_steps(rounds: int, fraction: float) -> int:
    """Expected participations of one client over the run (one DP step each)."""
    return max(round(rounds * fraction), 1)


@lru_cache(maxsize=4096)
def noise_multiplier(cfg: DPConfig, q: float, steps: int) -> float:
    """The smallest noise multiplier for which ``steps`` steps at rate ``q`` spend ``cfg.epsilon``."""
    return float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta, sample_rate=q,
                                      steps=steps, accountant="rdp"))


def spent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon spent by ``steps`` steps of the subsampled Gaussian mechanism (Opacus' RDP accountant)."""
    if steps == 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta))


@contextmanager
def private_gradients(model: nn.Module, sigma: float, clip: float, batch_size: int,
                      generator: torch.Generator | None = None) -> Iterator[DPOptimizer]:
    """Per-sample gradient hooks on ``model`` and a DP optimiser over its parameters.

    After ``loss.backward()`` on a batch, ``optimizer.pre_step()`` leaves the clipped, noised,
    batch-averaged gradient in each ``p.grad``. The hooks are removed on exit (the model object
    is reused for the next client in the in-process engine).
    """
    gsm = GradSampleModule(model, loss_reduction="mean")
    try:
        base = torch.optim.SGD(model.parameters(), lr=0.0)
        yield DPOptimizer(base, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=batch_size,
                          generator=generator)
    finally:
        gsm._close()
        for p in model.parameters():
            p.grad_sample = None
