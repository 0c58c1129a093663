"""SecAgg+ as Flower 1.41 ships it: the server learns each round's weighted sum, never one update.

Flower 1.41 offers SecAgg+ only in its legacy workflow API: ``SecAggPlusWorkflow`` run by a
``DefaultWorkflow`` over a ``LegacyContext`` and a legacy strategy on the server, ``secaggplus_mod``
on a ClientApp built from a ``client_fn``. This module puts fed-ser's clients there unchanged: the
same :func:`~fed_ser.core.training.client_update` on the same shard and seeds, replying with the
model (FedSGD: the one-step model ``theta - lr g``, whose weighted mean is FedSGD's server step).
What the server holds is what the observer of aggregates sees
(:mod:`attacks.inference.aggregate`): the aggregate, recorded per round in ``<out_dir>/aggregates.npz``.
Every round trains ``clients`` clients (SecAgg+ needs at least three), all of the federation.
Each client sends ``n_k / max_weight`` times its parameters, quantised over ``[-8, 8]`` in ``2^22``
steps; Flower's default ``max_weight`` of 1000 against a few dozen utterances a client multiplies
the quantisation error of the mean by ``1000 / sum n_k`` (measured: 5e-4 on first-layer weights of
a few 1e-2), so fed-ser sets it to the largest client's sample count.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fed_ser.core.model import build_model
from fed_ser.core.schedule import client_seed, federation_size
from fed_ser.core.settings import RunSettings
from fed_ser.core.training import client_update
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.flower.client_app import one_step_model


class _Client(NumPyClient):
    def __init__(self, s: RunSettings, pid: int) -> None:
        self.s, self.pid = s, pid
        self.data = FederatedData.load(s.prepared)

    def fit(self, parameters, config):
        s = self.s
        torch.set_num_threads(1)
        model = build_model(self.data.X.shape[1], s.dropout, s.seed)
        keys = list(model.state_dict())
        model.load_state_dict({k: torch.as_tensor(v) for k, v in zip(keys, parameters)})
        X, y = self.data.client_rows(self.pid, TRAIN)
        rnd = int(config["server-round"])
        r = client_update(model, X, y, s, client_seed(s.seed, rnd, self.pid), pid=self.pid,
                          num_clients=federation_size(s.min_available, self.data.num_clients))
        arrays = one_step_model(dict(zip(keys, parameters)), r.arrays, s.lr) if s.algorithm == "fedsgd" else r.arrays
        out = [arrays[k] for k in keys]
        return out, r.num_examples, {"partition-id": self.pid}


def make_secagg_client_app(s: RunSettings) -> ClientApp:
    """fed-ser's client behind ``secaggplus_mod``."""
    def client_fn(context: Context):
        return _Client(s, int(context.node_config["partition-id"])).to_client()
    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


class _AggregateObserver(FedAvg):
    """Flower's legacy FedAvg, keeping the one thing SecAgg+ gives the server: each round's aggregate."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.aggregates: dict[int, list[np.ndarray]] = {}

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.aggregates[server_round] = parameters_to_ndarrays(params)
        return params, metrics


def quantisation_bound(num_examples: list[int], max_weight: float, clipping_range: float = 8.0,
                       quantization_range: int = 2**22) -> float:
    """The largest error SecAgg+'s quantisation can put on one entry of the weighted mean: each client's
    stochastically rounded ``(n_k / max_weight) theta_k`` is off by less than one step, the sum by
    ``K`` steps, divided by ``sum n_k / max_weight``."""
    step = 2 * clipping_range / (quantization_range - 1)
    return len(num_examples) * step / (sum(num_examples) / max_weight)


def make_secagg_server_app(s: RunSettings, clients: int, reconstruction_threshold: float = 0.7,
                           max_weight: float | None = None) -> ServerApp:
    """A ServerApp that trains ``s.rounds`` rounds of ``clients`` clients under SecAgg+ (``max_weight``:
    the largest client's training sample count unless given)."""
    if clients < 3:
        raise ValueError(f"SecAgg+ needs at least 3 clients a round, got {clients}")
    app = ServerApp()

    @app.main()
    def main(grid, context: Context) -> None:
        data = FederatedData.load(s.prepared)
        model = build_model(data.X.shape[1], s.dropout, s.seed)
        keys = list(model.state_dict())
        strategy = _AggregateObserver(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients, min_available_clients=clients,
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]),
            on_fit_config_fn=lambda rnd: {"server-round": rnd})
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=s.rounds), strategy=strategy)
        weight = max_weight or float(max(len(data.client_rows(p, TRAIN)[1]) for p in range(clients)))
        secagg = SecAggPlusWorkflow(num_shares=clients, reconstruction_threshold=reconstruction_threshold, max_weight=weight)
        DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
        if s.out_dir:
            from pathlib import Path

            Path(s.out_dir).mkdir(parents=True, exist_ok=True)
            np.savez(Path(s.out_dir) / "aggregates.npz",
                     **{f"round{r}.{k}": v for r, arrays in strategy.aggregates.items() for k, v in zip(keys, arrays)})

    return app
