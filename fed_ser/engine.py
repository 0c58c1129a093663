"""In-process federated training: the same arithmetic as the Flower path, without Flower.

It samples clients, calls the shared :func:`fed_ser.training.client_update` with the same
per-(round, client) seeds as the ClientApp, aggregates with the same weights and feeds the same
:class:`fed_ser.recorder.UpdateRecorder`. Used as the bare-PyTorch reference for the Flower
simulation, and to produce recorded updates quickly where Ray is not the point (tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fed_ser.checkpoint import NAME as CHECKPOINT, save_checkpoint
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.model import build_model
from fed_ser.recorder import UpdateRecorder
from fed_ser.schedule import client_seed, federation_size, select_clients
from fed_ser.settings import RunSettings
from fed_ser.training import check_privacy, client_update, evaluate


def server_step(theta: dict[str, np.ndarray], mean: dict[str, np.ndarray], algorithm: str, lr: float) -> dict[str, np.ndarray]:
    """New global parameters from the sample-weighted mean of the client updates.

    FedSGD: ``theta - lr * sum_k (n_k/N) g_k``; FedAvg: ``sum_k (n_k/N) theta_k`` as is.
    """
    if algorithm == "fedsgd":
        return {k: (theta[k] - lr * mean[k]).astype(np.float32) for k in theta}
    return {k: np.asarray(mean[k], dtype=np.float32) for k in theta}


def aggregate(theta: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], weights: list[float],
              algorithm: str, lr: float) -> dict[str, np.ndarray]:
    """Weighted mean of the updates (weights n_k / N), then :func:`server_step`."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return server_step(theta, {k: sum(wk * u[k] for wk, u in zip(w, updates)) for k in updates[0]}, algorithm, lr)


def run_inprocess(data: FederatedData, s: RunSettings, recorder: UpdateRecorder | None = None) -> dict:
    """Train ``s.rounds`` rounds in this process; return final test metrics.

    With ``s.out_dir`` set, the final global model lands in ``<out_dir>/checkpoint.npz`` (the
    ServerApp's format, :mod:`fed_ser.checkpoint`).
    """
    torch.set_num_threads(1)
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    theta = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    n = federation_size(s.min_available, data.num_clients)
    check_privacy(s, n)
    for rnd in range(1, s.rounds + 1):
        updates, weights = [], []
        for pid in select_clients(s.seed, rnd, n, s.fraction):
            model.load_state_dict({k: torch.as_tensor(v) for k, v in theta.items()})
            X, y = data.client_rows(pid, TRAIN)
            r = client_update(model, X, y, s, client_seed(s.seed, rnd, pid), pid=pid, num_clients=n)
            if recorder is not None:
                recorder.record(round=rnd, node=pid, partition=pid, num_examples=r.num_examples, steps=r.steps,
                                arrays=r.arrays, global_arrays=theta)
            updates.append(r.arrays)
            weights.append(r.num_examples)
        theta = aggregate(theta, updates, weights, s.algorithm, s.lr)
    if s.out_dir:
        save_checkpoint(Path(s.out_dir) / CHECKPOINT, s.rounds, s, theta)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in theta.items()})
    X_test, y_test = data.test_rows()
    return evaluate(model, X_test, y_test)
