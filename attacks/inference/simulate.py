"""A client's round as the server can simulate it: from the round's global model, with the local settings.

What the server of the paper's threat model knows about a FedAvg client's round (Dimitrov et al.,
"Data leakage in federated averaging", TMLR 2022, build their attack on the same knowledge): the
global model it sent, the client's ``num-examples`` (sent in the clear), and the protocol's local
settings (``fl.local_epochs``, ``fl.batch_size``, ``fl.optimizer``, ``fl.lr``, ``model.dropout``).
It does not know the client's rows, their order, nor the dropout masks its local seed draws.

Two ways to replay a round, both on fed-ser's one definition of a client's work:

* :func:`client_delta` runs :func:`fed_ser.core.training.local_update` itself (the training loop
  every engine uses) on rows the attacker chooses, and returns what the recorder would store:
  ``theta(t) - theta_k(t)`` (FedAvg) or the gradient (FedSGD). The round-matched attack
  (:mod:`attacks.inference.round_matched`) trains on such simulated updates.
* :class:`Unroll` replays the same steps differentiably in the inputs (for the inversion,
  :mod:`attacks.inference.unrolled`): the model's own forward pass under ``torch.func``, the batches
  of :func:`fed_ser.core.training.local_plan`'s layout, and the optimiser's own update rule
  (``torch.optim``'s functional Adam / SGD, with the hyper-parameters :func:`make_optimizer` sets).
  Its one relaxation is Adam's ``eps`` (``tau``): at the clients' ``1e-8`` Adam's first step is
  ``lr * sign(g)``, whose derivative in the inputs is zero almost everywhere; a larger ``tau``
  makes it a smooth ``lr * g / (|g| + tau)`` that gradient matching can follow. With
  ``tau = None`` (the clients' own eps) and the clients' dropout masks it computes what
  :func:`local_update` computes (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call
from torch.nn import functional as F
from torch.optim.adam import adam as adam_rule
from torch.optim.sgd import sgd as sgd_rule

from fed_ser.core.model import SERModel
from fed_ser.core.training import local_update, make_optimizer


@dataclass(frozen=True)
class LocalSettings:
    """The protocol's local settings, as the server knows them (``fl.*``, ``model.dropout``)."""

    algorithm: str = "fedavg"
    local_epochs: int = 1
    batch_size: int = 20
    optimizer: str = "adam"
    lr: float = 5e-4
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.algorithm not in ("fedsgd", "fedavg"):
            raise ValueError(f"fl.algorithm: {self.algorithm!r} is not 'fedsgd' or 'fedavg'")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"fl.optimizer: {self.optimizer!r} is not 'sgd' or 'adam'")
        if self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"local settings: local_epochs {self.local_epochs}, batch size {self.batch_size} and lr {self.lr} must be positive")

    @classmethod
    def of(cls, settings) -> LocalSettings:
        """These settings from any object with the same six attributes (e.g. the experiment's own)."""
        return cls(**{k: getattr(settings, k) for k in cls.__dataclass_fields__})

    def steps(self, n: int) -> int:
        """T: the optimiser steps of a client with ``n`` rows (the recorder's ``steps``)."""
        return 1 if self.algorithm == "fedsgd" else self.local_epochs * -(-n // self.batch_size)

    def batches(self, n: int) -> list[np.ndarray]:
        """The batch layout of one client's round with the rows in order ``0..n-1``: each epoch
        cut in batches of ``batch_size`` (the client permutes its rows every epoch; the attacker does not
        know how, so its own rows stand in for them in this fixed order)."""
        if self.algorithm == "fedsgd":
            return [np.arange(min(n, self.batch_size))]
        return [np.arange(i, min(i + self.batch_size, n)) for _ in range(self.local_epochs) for i in range(0, n, self.batch_size)]


def model_at(params: dict[str, np.ndarray], dropout: float) -> SERModel:
    """The SER model holding ``params`` (a global record's arrays); its shapes come from them."""
    W1, W2, W3 = params["dense1.weight"], params["dense2.weight"], params["out.weight"]
    model = SERModel(W1.shape[1], dropout, hidden=(W1.shape[0], W2.shape[0]), n_classes=W3.shape[0])
    model.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in params.items()})
    return model


def client_delta(model: SERModel, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray,
                 settings: LocalSettings, seed: int) -> dict[str, np.ndarray]:
    """What the recorder stores for a client with rows ``X``, ``y`` starting from ``params``: its
    gradient (FedSGD) or ``theta - theta_k`` (FedAvg), after :func:`local_update` with seed ``seed``.
    ``model`` is reused (its parameters are overwritten with ``params``)."""
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    res = local_update(model, X, y, algorithm=settings.algorithm, batch_size=settings.batch_size, lr=settings.lr,
                       epochs=settings.local_epochs, optimizer=settings.optimizer, seed=seed)
    if settings.algorithm == "fedsgd":
        return res.arrays
    return {k: params[k] - res.arrays[k] for k in params}


def simulate_deltas(params: dict[str, np.ndarray], clients: Sequence[tuple[np.ndarray, np.ndarray]],
                    settings: LocalSettings, seeds: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """:func:`client_delta` for each ``(X, y)`` of ``clients`` from the same global ``params``."""
    params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    model = model_at(params, settings.dropout)
    return [client_delta(model, params, X, y, settings, int(s)) for (X, y), s in zip(clients, seeds)]


class Unroll:
    """A client's round, differentiable in its inputs: ``delta(X, Y)`` is ``theta - theta_k`` for
    rows ``X`` (n, d) with soft labels ``Y`` (n, classes; rows sum to 1), batches in
    :meth:`LocalSettings.batches`'s layout, no dropout unless ``keep`` gives each step's multiplier
    (the attacker does not know the client's masks: their expectation is 1), and Adam's eps
    replaced by ``tau`` where given (see the module's docstring)."""

    def __init__(self, params: dict[str, np.ndarray], settings: LocalSettings):
        self.settings = settings
        self.model = model_at(params, 0.0)
        self.names = [k for k, _ in self.model.named_parameters()]
        self.theta = [p.detach().clone() for _, p in self.model.named_parameters()]
        # the clients' optimiser's hyper-parameters, as make_optimizer sets them
        self.hyper = make_optimizer(settings.optimizer, [torch.zeros(1, requires_grad=True)], settings.lr).defaults

    def delta(self, X: torch.Tensor, Y: torch.Tensor, tau: float | None = None,
              keep: Sequence[torch.Tensor | None] | None = None,
              batches: Sequence[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        """``theta - theta_k`` after the round (FedSGD: the gradient); ``batches`` overrides the layout
        (e.g. a :func:`~fed_ser.core.training.local_plan`'s rows, with its masks as ``keep``)."""
        s, h = self.settings, self.hyper
        batches = s.batches(len(X)) if batches is None else batches
        work = [t.clone().requires_grad_(True) for t in self.theta]
        exp_avg = [torch.zeros_like(t) for t in work]
        exp_avg_sq = [torch.zeros_like(t) for t in work]
        steps = [torch.tensor(0.0) for _ in work]
        grads: list[torch.Tensor] = []
        for t, rows in enumerate(batches):
            idx = torch.as_tensor(rows)
            k = None if keep is None else keep[t]
            logits = functional_call(self.model, dict(zip(self.names, work)), (X[idx], k))
            loss = -(Y[idx] * F.log_softmax(logits, 1)).sum(1).mean()
            grads = list(torch.autograd.grad(loss, work, create_graph=True))
            if s.algorithm == "fedsgd":
                return {n: g for n, g in zip(self.names, grads)}
            work = [w.clone() for w in work]  # the rule steps in place; the graph keeps the previous step
            if s.optimizer == "adam":
                adam_rule(work, grads, exp_avg, exp_avg_sq, [], steps, foreach=False, differentiable=True,
                          amsgrad=False, beta1=h["betas"][0], beta2=h["betas"][1], lr=h["lr"],
                          weight_decay=h["weight_decay"], eps=h["eps"] if tau is None else tau, maximize=False)
            else:
                sgd_rule(work, grads, [None] * len(work), foreach=False,
                         weight_decay=h["weight_decay"], momentum=h["momentum"], lr=h["lr"], dampening=h["dampening"],
                         nesterov=h["nesterov"], maximize=False)
        return {n: t0 - w for n, t0, w in zip(self.names, self.theta, work)}
