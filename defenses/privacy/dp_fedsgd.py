"""DP-FedSGD: per-sample clipping and Gaussian noise on each client's gradient, with Opacus.

A FedSGD client shares the gradient of one mini-batch drawn from its ``n`` rows. Under
sample-level DP the batch is a **Poisson sample**: each row independently with probability
``q = b / n`` (``b`` the batch size; as Opacus' ``DPDataLoader`` draws it, and as the RDP
analysis of the subsampled Gaussian mechanism assumes). The gradient is computed with Opacus'
``GradSampleModule`` (per-sample gradients) and ``DPOptimizer.pre_step`` (clip each per-sample
gradient to ``clip``, sum, add ``N(0, (noise_multiplier * clip)^2)``, divide by the expected batch
size ``b``), inside the shared local loop (whose plan draws the Poisson batch:
:func:`fed_ser.core.training.poisson_rows`); an empty sample sends the noise alone.

Accounting per client (:mod:`defenses.privacy.accounting`, Opacus' RDP accountant): one step per round
the client takes part in, sample rate ``q``. The noise multiplier is calibrated so that a given
number of steps spends ``epsilon`` at ``delta``; the caller chooses that number (fed_ser passes
each client's scheduled participations, ``dp.calibrate=per_client``, or the expected
``rounds * fraction``, :func:`planned_steps`). The epsilon *spent* is computed afterwards from
the participations that happened. The guarantee is per utterance (sample level), not per client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from defenses.privacy import check_privacy_parameters
from defenses.privacy.accounting import calibrate, spent


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP for FedSGD: target ``epsilon`` at ``delta``, per-sample clipping norm ``clip``."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0

    def __post_init__(self) -> None:
        check_privacy_parameters(self.epsilon, self.delta, self.clip)


def planned_steps(rounds: int, fraction: float) -> int:
    """Expected participations of one client over the run (one DP step each)."""
    return max(round(rounds * fraction), 1)


def noise_multiplier(cfg: DPConfig, q: float, steps: int) -> float:
    """The smallest noise multiplier for which ``steps`` steps at rate ``q`` spend ``cfg.epsilon``."""
    return calibrate(cfg.epsilon, cfg.delta, q, steps)


def spent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon spent by ``steps`` steps of the subsampled Gaussian mechanism (Opacus' RDP accountant)."""
    return spent(sigma, q, steps, delta)


@dataclass(frozen=True)
class PrivateGradient:
    """DP-FedSGD's gradient of one Poisson batch, for the shared local loop (``local_update(dp_sgd=...)``).

    :meth:`hooks` puts Opacus' per-sample gradient hooks on the model and yields ``finish(rows)``:
    after ``loss.backward()`` on a batch of ``rows`` rows it leaves in each ``p.grad`` the per-sample
    clipped (``clip``), summed, noised (``N(0, (noise_multiplier clip)^2)``) gradient divided by
    ``expected_batch_size``; for an empty Poisson sample (``rows == 0``, no backward ran) the noise alone.
    """

    noise_multiplier: float
    clip: float
    expected_batch_size: int

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[Callable[[int], None]]:
        """The hooks are removed on exit (the in-process engine reuses the model for the next client)."""
        gsm = GradSampleModule(model, loss_reduction="mean")
        try:
            opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=self.noise_multiplier,
                              max_grad_norm=self.clip, expected_batch_size=self.expected_batch_size)

            def finish(rows: int) -> None:
                if rows > 0:
                    opt.pre_step()  # clip per-sample gradients, sum, add noise, average: into p.grad
                    return
                for p in model.parameters():
                    p.summed_grad = torch.zeros_like(p)
                opt.add_noise()
                for p in model.parameters():
                    p.grad /= opt.expected_batch_size

            yield finish
        finally:
            gsm._close()
            for p in model.parameters():
                p.grad_sample = None
