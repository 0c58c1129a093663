"""Adversarial examples against the SER model: FGSM and PGD on its input features.

The threat model is a bounded perturbation ``delta`` of one utterance's feature vector,
``||delta||_inf <= epsilon`` or ``||delta||_2 <= epsilon``, in the model's input units (the
per-speaker z-normalised features: epsilon 0.1 moves each functional by a tenth of that speaker's
standard deviation). The features have no box constraint (unlike images in [0, 1]), which is why
this is a small implementation rather than torchattacks, whose attacks clamp to [0, 1].

- :func:`fgsm`: one signed (L-inf) or normalised (L2) gradient step of size epsilon
  (Goodfellow et al. 2015).
- :func:`pgd`: ``steps`` such steps of ``step_size``, each projected back onto the epsilon ball,
  from a random start (Madry et al. 2018); the highest-loss iterate per example is returned, so
  more steps never give a weaker attack than fewer.
- Expectation over transformation (Athalye et al. 2018): with ``eot_draws > 1`` every gradient is
  the mean over that many forward passes, the adaptive attacker of a randomised defence.

The model is any callable from features to logits (``nn.Module``); put it in eval mode first.
Nothing here knows about Flower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fed_ser.core.metrics import unweighted_average_recall

METHODS = ("fgsm", "pgd")
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class PerturbationConfig:
    """One adversarial attack: method, norm ball and PGD schedule."""

    method: str = "pgd"  # fgsm | pgd
    norm: str = "linf"  # linf | l2
    epsilon: float = 0.1  # radius of the norm ball, in input (z-score) units
    steps: int = 10  # PGD iterations (FGSM: 1)
    step_size: float = 0.0  # PGD step; 0: 2.5 * epsilon / steps (Madry et al.)
    random_start: bool = True  # PGD starts from a uniform point of the ball
    eot_draws: int = 1  # gradient averaged over this many forward passes (adaptive attack on randomness)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"attack.method: {self.method!r} is not one of {METHODS}")
        if self.norm not in NORMS:
            raise ValueError(f"attack.norm: {self.norm!r} is not one of {NORMS}")
        if not self.epsilon >= 0:
            raise ValueError(f"attack.epsilon: must be >= 0, got {self.epsilon}")
        if self.steps < 1 or self.eot_draws < 1:
            raise ValueError("attack.steps and attack.eot_draws must be >= 1")
        if self.step_size < 0:
            raise ValueError(f"attack.step_size: must be >= 0 (0: automatic), got {self.step_size}")

    @property
    def alpha(self) -> float:
        """The PGD step size actually used."""
        return self.step_size or 2.5 * self.epsilon / self.steps


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-example cross-entropy averaged over ``draws`` forward passes (one pass if deterministic)."""
    return torch.stack([F.cross_entropy(model(x), y, reduction="none") for _ in range(draws)]).mean(0)


def _loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss and its input gradient, both averaged over ``draws`` forward passes."""
    x = x.detach().requires_grad_(True)
    loss = _loss(model, x, y, draws)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit steepest-ascent direction of the norm: sign (L-inf) or normalised gradient (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """``delta`` moved to the nearest point of the epsilon ball (per example)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    n = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
    return delta * torch.clamp(epsilon / n.clamp_min(1e-12), max=1.0)


def _random_start(x: torch.Tensor, epsilon: float, norm: str, gen: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=gen) * 2 - 1) * epsilon
    d = torch.randn(x.shape, generator=gen)
    d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen) ** (1.0 / x[0].numel())
    return d * r * epsilon  # uniform in the L2 ball


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, norm: str = "linf",
         eot_draws: int = 1) -> torch.Tensor:
    """Fast gradient (sign) method: ``x + epsilon * ascent(grad_x loss)``."""
    if epsilon == 0:
        return x.detach().clone()
    _, grad = _loss_and_grad(model, x, y, eot_draws)
    return (x + epsilon * _ascent(grad, norm)).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, *, norm: str = "linf", steps: int = 10,
        step_size: float = 0.0, random_start: bool = True, eot_draws: int = 1,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent on the loss; returns each example's highest-loss iterate."""
    if epsilon == 0:
        return x.detach().clone()
    alpha = step_size or 2.5 * epsilon / steps
    x = x.detach()
    delta = _random_start(x, epsilon, norm, generator) if random_start else torch.zeros_like(x)
    best, best_loss = (x + delta).clone(), torch.full((len(x),), -float("inf"))
    for _ in range(steps):
        loss, grad = _loss_and_grad(model, x + delta, y, eot_draws)
        better = loss > best_loss
        best[better], best_loss[better] = (x + delta)[better], loss[better]
        delta = project(delta + alpha * _ascent(grad, norm), epsilon, norm)
    with torch.no_grad():
        loss = _loss(model, x + delta, y, eot_draws)
    better = loss > best_loss
    best[better] = (x + delta)[better]
    return best.detach()


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PerturbationConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial versions of ``x`` under ``cfg`` (FGSM or PGD)."""
    if cfg.method == "fgsm":
        return fgsm(model, x, y, cfg.epsilon, cfg.norm, cfg.eot_draws)
    return pgd(model, x, y, cfg.epsilon, norm=cfg.norm, steps=cfg.steps, step_size=cfg.alpha,
               random_start=cfg.random_start, eot_draws=cfg.eot_draws, generator=generator)


def robust_metrics(model: nn.Module, X: np.ndarray, y: np.ndarray, cfg: PerturbationConfig, *,
                   target: nn.Module | None = None, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Accuracy and UAR of ``target`` on adversarial examples crafted against ``model``.

    ``target=None`` attacks the evaluated model itself (white box); a different ``target`` is a
    static (transfer) attack, e.g. examples crafted on the bare model fed to its randomised wrapper.
    Both models are switched to eval mode.
    """
    target = model if target is None else target
    model.eval()
    target.eval()
    gen = torch.Generator().manual_seed(seed)
    Xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    preds = []
    for start in range(0, len(Xt), batch_size):
        xb, yb = Xt[start : start + batch_size], yt[start : start + batch_size]
        x_adv = perturb(model, xb, yb, cfg, gen)
        with torch.no_grad():
            preds.append(target(x_adv).argmax(1))
    pred = torch.cat(preds).numpy()
    return {"acc": float(np.mean(pred == np.asarray(y))), "uar": unweighted_average_recall(np.asarray(y), pred)}
