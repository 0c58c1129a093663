"""Vectorised in-process federated training: every selected client of a round in one call.

The attacker's shadow training records thousands of client updates; a per-client Python loop
spends most of its time outside the arithmetic. Here the clients of a round are stacked and
their local computation runs under ``torch.func.vmap``: FedSGD takes one batched per-client
gradient at the shared global parameters; FedAvg keeps a stack of client parameters (and Adam
moments) and steps all clients together, masking clients whose shards are already exhausted.

Everything random comes from the same places as in :func:`fed_ser.core.training.local_update`:
the client selection and seeds of :mod:`fed_ser.core.schedule`, the mini-batch order from
``numpy.random.default_rng(seed)`` and the dropout masks from torch's RNG after
``torch.manual_seed(seed)``. So for the same seed this engine records the same updates as the
Flower path (to float rounding; a test checks 1e-5) into the same store format.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import grad_and_value, vmap
from torch.nn import functional as F
from tqdm import tqdm

from fed_ser.core.aggregation import server_step
from fed_ser.core.metrics import evaluate
from fed_ser.core.model import build_model, dropout_multiplier, functional_forward
from fed_ser.core.schedule import client_seed, federation_size, select_clients
from fed_ser.core.settings import RunSettings
from fed_ser.core.training import ADAM, seed_client_rng
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.recording.recorder import UpdateRecorder

Params = dict[str, torch.Tensor]


@dataclass
class _Plan:
    """One client's local schedule: row indices and dropout multiplier of every local step."""

    X: torch.Tensor
    y: torch.Tensor
    steps: list[tuple[np.ndarray, torch.Tensor | None]]


def _plan(X: np.ndarray, y: np.ndarray, s: RunSettings, seed: int, hidden: int) -> _Plan:
    """Replay the random draws of ``local_update`` for this client and seed."""
    rng = np.random.default_rng(seed)
    seed_client_rng(seed)
    steps = []
    for _ in range(s.local_epochs if s.algorithm == "fedavg" else 1):
        order = rng.permutation(len(X))
        for start in range(0, len(X), s.batch_size):
            idx = order[start : start + s.batch_size]
            steps.append((idx, dropout_multiplier(len(idx), hidden, s.dropout)))
            if s.algorithm == "fedsgd":
                break
    return _Plan(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long), steps)


def _client_loss(params: Params, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real rows of one padded batch (``w`` = 1/n on real rows, 0 on padding)."""
    return (w * F.cross_entropy(functional_forward(params, x, keep), y, reduction="none")).sum()


def _stack_step(plans: list[_Plan], t: int, batch: int, width: int) -> tuple[torch.Tensor, ...]:
    """Padded ``(x, y, w, keep, active)`` of local step ``t`` for every client."""
    K, D = len(plans), plans[0].X.shape[1]
    x = torch.zeros(K, batch, D)
    y = torch.zeros(K, batch, dtype=torch.long)
    w = torch.zeros(K, batch)
    keep = torch.ones(K, batch, width)
    active = torch.zeros(K, dtype=torch.bool)
    for k, p in enumerate(plans):
        if t >= len(p.steps):
            continue
        idx, mult = p.steps[t]
        n = len(idx)
        x[k, :n], y[k, :n], w[k, :n] = p.X[idx], p.y[idx], 1.0 / n
        if mult is not None:
            keep[k, :n] = mult
        active[k] = True
    return x, y, w, keep, active


_per_client_shared = vmap(grad_and_value(_client_loss), in_dims=(None, 0, 0, 0, 0))
_per_client_own = vmap(grad_and_value(_client_loss), in_dims=(0, 0, 0, 0, 0))


def fedsgd_round(theta: Params, plans: list[_Plan], batch: int, width: int) -> tuple[Params, torch.Tensor]:
    """Per-client gradients of one mini-batch at the shared ``theta``: ``{name: [K, ...]}``, losses."""
    x, y, w, keep, _ = _stack_step(plans, 0, batch, width)
    return _per_client_shared(theta, x, y, w, keep)


def fedavg_round(theta: Params, plans: list[_Plan], batch: int, width: int, lr: float, optimizer: str) -> tuple[Params, torch.Tensor]:
    """Every client's parameters after its local epochs (SGD or the paper's Adam), stacked; mean losses."""
    K = len(plans)
    params = {k: v.unsqueeze(0).repeat(K, *([1] * v.dim())) for k, v in theta.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    b1, b2 = ADAM["betas"]
    loss_sum = torch.zeros(K)
    for t in range(max(len(p.steps) for p in plans)):
        x, y, w, keep, active = _stack_step(plans, t, batch, width)
        grads, loss = _per_client_own(params, x, y, w, keep)
        loss_sum += torch.where(active, loss, 0.0)
        step = t + 1  # every active client has taken exactly t steps before this one
        for k in params:
            a = active.view(-1, *([1] * (params[k].dim() - 1)))
            g = grads[k]
            if optimizer == "sgd":
                new = params[k] - lr * g
            else:  # torch.optim.Adam (L2 weight decay, bias-corrected moments), element for element
                g = g + ADAM["weight_decay"] * params[k]
                m_new = torch.lerp(m[k], g, 1 - b1)
                v_new = v2[k] * b2 + (1 - b2) * (g * g)
                denom = v_new.sqrt() / math.sqrt(1 - b2**step) + ADAM["eps"]
                new = params[k] - (lr / (1 - b1**step)) * (m_new / denom)
                m[k], v2[k] = torch.where(a, m_new, m[k]), torch.where(a, v_new, v2[k])
            params[k] = torch.where(a, new, params[k])
    return params, loss_sum / torch.tensor([len(p.steps) for p in plans], dtype=torch.float32)


def run_vectorized(data: FederatedData, s: RunSettings, recorder: UpdateRecorder | None = None,
                   progress: bool = True) -> dict:
    """Train ``s.rounds`` rounds with all of a round's clients at once; return test metrics and timing."""
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    width = model.dense1.out_features
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_clients = federation_size(s.min_available, data.num_clients)
    rows = {pid: data.client_rows(pid, TRAIN) for pid in range(n_clients)}
    t0 = time.perf_counter()
    history = []
    for rnd in tqdm(range(1, s.rounds + 1), desc=f"{s.algorithm} (vectorised)", disable=not progress, unit="round"):
        pids = select_clients(s.seed, rnd, n_clients, s.fraction)
        plans = [_plan(*rows[pid], s, client_seed(s.seed, rnd, pid), width) for pid in pids]
        if s.algorithm == "fedsgd":
            out, loss = fedsgd_round(theta, plans, s.batch_size, width)
        else:
            out, loss = fedavg_round(theta, plans, s.batch_size, width, s.lr, s.optimizer)
        theta_np = {k: v.numpy() for k, v in theta.items()}
        if recorder is not None:
            for i, (pid, plan) in enumerate(zip(pids, plans)):
                recorder.record(round=rnd, node=pid, partition=pid, num_examples=len(plan.X), steps=len(plan.steps),
                                arrays={k: v[i].numpy() for k, v in out.items()}, global_arrays=theta_np)
            recorder.commit()
        n = torch.tensor([len(p.X) for p in plans], dtype=torch.float64)
        w = (n / n.sum()).float()  # Flower's sample-weighted mean, n_k / N
        mean = {k: torch.tensordot(w, v, dims=1).numpy() for k, v in out.items()}
        theta = {k: torch.as_tensor(v) for k, v in server_step(theta_np, mean, s.algorithm, s.lr).items()}
        history.append({"round": rnd, "sampled": len(pids), "replies": len(pids), "train_loss": float(loss.mean())})
    model.load_state_dict(theta)
    X_test, y_test = data.test_rows()
    m = evaluate(model, X_test, y_test)
    history[-1].update(test_acc=m["acc"], test_uar=m["uar"])
    return {"engine": "vectorised", "settings": s.to_run_config(), "num_clients": data.num_clients,
            "wall_seconds": time.perf_counter() - t0, "rounds": history,
            "final": {"test_acc": m["acc"], "test_uar": m["uar"], "round": s.rounds}}
