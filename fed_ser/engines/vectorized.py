"""Vectorised in-process federated training: every selected client of a round in one call.

The attacker's shadow training records thousands of client updates; a per-client Python loop
spends most of its time outside the arithmetic. Here the clients of a round are stacked and
their local work runs under ``torch.func.vmap``: the same plan (:func:`fed_ser.core.training.local_plan`:
batches and dropout masks from the client's seed), the same forward pass (the model's own, through
``functional_call``) and the same optimiser (:func:`fed_ser.core.training.make_optimizer`, stepping
a stack of client parameters, which is elementwise the same as one optimiser per client) as
:func:`fed_ser.core.training.local_update`. FedSGD takes one batched per-client gradient at the
shared global parameters; FedAvg steps all clients together and keeps each client's parameters as
they were after its last step (clients with shorter shards finish early).

Client selection and seeds come from :mod:`fed_ser.core.schedule` and the server step from
:func:`fed_ser.core.aggregation.aggregate`, so for the same seed this engine records the same
updates as the Flower path (to float rounding; a test checks 1e-5) into the same store format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F
from tqdm import tqdm

from fed_ser.core.aggregation import aggregate
from fed_ser.core.metrics import evaluate
from fed_ser.core.model import build_model
from fed_ser.core.schedule import client_seed, federation_size, select_clients
from fed_ser.core.training import LocalStep, local_plan, make_optimizer
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.run.settings import RunSettings

Params = dict[str, torch.Tensor]


@dataclass
class ClientWork:
    """One client's shard and its :func:`~fed_ser.core.training.local_plan` for the round."""

    X: torch.Tensor
    y: torch.Tensor
    steps: list[LocalStep]


def client_work(X: np.ndarray, y: np.ndarray, s: RunSettings, seed: int, model: nn.Module) -> ClientWork:
    """The client's rows and its plan under ``s`` for the local-batch seed ``seed``."""
    steps = local_plan(len(X), algorithm=s.algorithm, batch_size=s.batch_size, epochs=s.local_epochs, seed=seed,
                       hidden=model.dense1.out_features, dropout=s.dropout)
    return ClientWork(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long), steps)


def _stack_step(work: list[ClientWork], t: int, batch: int, width: int) -> tuple[torch.Tensor, ...]:
    """Padded ``(x, y, w, keep, active)`` of local step ``t`` for every client (``w`` = 1/n on real rows, 0 on padding)."""
    K, D = len(work), work[0].X.shape[1]
    x = torch.zeros(K, batch, D)
    y = torch.zeros(K, batch, dtype=torch.long)
    w = torch.zeros(K, batch)
    keep = torch.ones(K, batch, width)
    active = torch.zeros(K, dtype=torch.bool)
    for k, c in enumerate(work):
        if t >= len(c.steps):
            continue
        step = c.steps[t]
        n = len(step.rows)
        x[k, :n], y[k, :n], w[k, :n] = c.X[step.rows], c.y[step.rows], 1.0 / n
        if step.keep is not None:
            keep[k, :n] = step.keep
        active[k] = True
    return x, y, w, keep, active


def _per_client(model: nn.Module, shared: bool):
    """``vmap`` of the gradient of one client's mean batch loss: at shared parameters, or at each client's own."""

    def loss(params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return (w * F.cross_entropy(functional_call(model, params, (x, keep)), y, reduction="none")).sum()

    return vmap(grad_and_value(loss), in_dims=(None if shared else 0, 0, 0, 0, 0))


def fedsgd_round(model: nn.Module, theta: Params, work: list[ClientWork], batch: int) -> tuple[Params, torch.Tensor]:
    """Per-client gradients of one mini-batch at the shared ``theta``: ``{name: [K, ...]}``, losses."""
    x, y, w, keep, _ = _stack_step(work, 0, batch, model.dense1.out_features)
    return _per_client(model, shared=True)(theta, x, y, w, keep)


def fedavg_round(model: nn.Module, theta: Params, work: list[ClientWork], batch: int, lr: float,
                 optimizer: str) -> tuple[Params, torch.Tensor]:
    """Every client's parameters after its local epochs (``fl.optimizer``'s optimiser), stacked; mean losses."""
    K = len(work)
    params = {k: v.unsqueeze(0).repeat(K, *([1] * v.dim())) for k, v in theta.items()}
    opt = make_optimizer(optimizer, list(params.values()), lr)
    final = {k: v.clone() for k, v in params.items()}
    step_grads = _per_client(model, shared=False)
    loss_sum = torch.zeros(K)
    for t in range(max(len(c.steps) for c in work)):
        x, y, w, keep, active = _stack_step(work, t, batch, model.dense1.out_features)
        grads, loss = step_grads({k: v.detach() for k, v in params.items()}, x, y, w, keep)
        loss_sum += torch.where(active, loss, 0.0)
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        for k, p in params.items():  # a client whose shard is done keeps its parameters after its last step
            final[k] = torch.where(active.view(-1, *([1] * (p.dim() - 1))), p.detach(), final[k])
    return final, loss_sum / torch.tensor([len(c.steps) for c in work], dtype=torch.float32)


def run_vectorized(data: FederatedData, s: RunSettings, recorder: UpdateRecorder | None = None,
                   progress: bool = True) -> dict:
    """Train ``s.rounds`` rounds with all of a round's clients at once; return test metrics and timing."""
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_clients = federation_size(s.min_available, data.num_clients)
    rows = {c: data.client_rows(c, TRAIN) for c in range(n_clients)}
    t0 = time.perf_counter()
    history = []
    for rnd in tqdm(range(1, s.rounds + 1), desc=f"{s.algorithm} (vectorised)", disable=not progress, unit="round"):
        clients = select_clients(s.seed, rnd, n_clients, s.fraction)
        work = [client_work(*rows[c], s, client_seed(s.seed, rnd, c), model) for c in clients]
        if s.algorithm == "fedsgd":
            out, loss = fedsgd_round(model, theta, work, s.batch_size)
        else:
            out, loss = fedavg_round(model, theta, work, s.batch_size, s.lr, s.optimizer)
        theta_np = {k: v.numpy() for k, v in theta.items()}
        updates = [{k: v[i].numpy() for k, v in out.items()} for i in range(len(work))]
        if recorder is not None:
            for client, c, u in zip(clients, work, updates):
                recorder.record(round=rnd, client=client, num_examples=len(c.X), steps=len(c.steps),
                                arrays=u, global_arrays=theta_np)
            recorder.commit()
        theta = {k: torch.as_tensor(v) for k, v in aggregate(theta_np, updates, [len(c.X) for c in work], s.algorithm, s.lr).items()}
        history.append({"round": rnd, "sampled": len(clients), "replies": len(clients), "train_loss": float(loss.mean())})
    model.load_state_dict(theta)
    X_test, y_test = data.test_rows()
    m = evaluate(model, X_test, y_test, data.test_speakers())
    history[-1].update(test_acc=m["acc"], test_uar=m["uar"])
    return {"engine": "vectorised", "settings": s.to_run_config(), "num_clients": data.num_clients,
            "wall_seconds": time.perf_counter() - t0, "rounds": history,
            "final": {"test_acc": m["acc"], "test_uar": m["uar"], "test_counts": m.get("counts"), "round": s.rounds}}
