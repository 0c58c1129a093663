"""In-process federated training: the same arithmetic as the Flower path, without Flower.

It samples clients, calls the shared :func:`fed_ser.run.client.client_update` with the same
per-(round, client) seeds as the ClientApp, aggregates with the same weights and feeds the same
:class:`fed_ser.recording.recorder.UpdateRecorder`. Used as the bare-PyTorch reference for the Flower
simulation, and to produce recorded updates quickly where Ray is not the point (tests).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fed_ser.core.aggregation import aggregate
from fed_ser.core.metrics import evaluate
from fed_ser.core.model import build_model
from fed_ser.core.schedule import client_seed, federation_size, select_clients
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.recording.checkpoint import NAME as CHECKPOINT
from fed_ser.recording.checkpoint import save_checkpoint
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.run.client import client_update
from fed_ser.run.privacy import check_privacy
from fed_ser.run.settings import RunSettings


def run_inprocess(data: FederatedData, s: RunSettings, recorder: UpdateRecorder | None = None) -> dict:
    """Train ``s.rounds`` rounds in this process; return final test metrics.

    With ``s.out_dir`` set, the final global model lands in ``<out_dir>/checkpoint.npz`` (the
    ServerApp's format, :mod:`fed_ser.recording.checkpoint`).
    """
    torch.set_num_threads(1)
    model = build_model(data.X.shape[1], s.dropout, s.seed)
    theta = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    n = federation_size(s.min_available, data.num_clients)
    check_privacy(s, n)
    for rnd in range(1, s.rounds + 1):
        updates, weights = [], []
        for client in select_clients(s.seed, rnd, n, s.fraction):
            model.load_state_dict({k: torch.as_tensor(v) for k, v in theta.items()})
            X, y = data.client_rows(client, TRAIN)
            r = client_update(model, X, y, s, client_seed(s.seed, rnd, client), client=client, num_clients=n)
            if recorder is not None:
                recorder.record(round=rnd, client=client, num_examples=r.num_examples, steps=r.steps,
                                arrays=r.arrays, global_arrays=theta)
            updates.append(r.arrays)
            weights.append(r.num_examples)
        if recorder is not None:
            recorder.commit()
        theta = aggregate(theta, updates, weights, s.algorithm, s.lr)
    if s.out_dir:
        save_checkpoint(Path(s.out_dir) / CHECKPOINT, s.rounds, s, theta)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in theta.items()})
    X_test, y_test = data.test_rows()
    return evaluate(model, X_test, y_test, data.test_speakers())
