"""A plain Flower app, the reference for Flower's own per-round cost (issue 20, item 4).

Flower's ``FedAvg`` (``flwr.serverapp.strategy``) over ClientApps that do no work: each replies
with the arrays it received and a ``num-examples`` metric, no torch, no data. The same simulation
engine, node count, clients per round and array shapes as fed-ser's run, so what it costs a round
is what Flower's message path costs (server -> in-memory SuperLink state -> Ray actor -> ClientApp
-> back), with nothing of fed-ser in it. With one-element arrays instead of the model's, the
difference is what serialising and moving ~1 MB per message costs.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation


def _client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"],
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return app


def _server_app(shapes: dict[str, tuple[int, ...]], rounds: int, fraction: float, out: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        arrays = ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in shapes.items()})
        strategy = FedAvg(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        t = time.perf_counter()
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, train_config=ConfigRecord({}))
        out["rounds_s"] = time.perf_counter() - t

    return app


def plain_flower_rounds(num_nodes: int, fraction: float, rounds: int, shapes: dict[str, tuple[int, ...]]) -> float:
    """Seconds the plain app's ``rounds`` rounds take (Ray's start excluded), in the engine fed-ser uses."""
    out: dict = {}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    init_args = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
                 "num_cpus": os.cpu_count() or 1, "address": "local"}
    run_simulation(server_app=_server_app(shapes, rounds, fraction, out), client_app=_client_app(),
                   num_supernodes=num_nodes, backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": init_args})
    return out["rounds_s"]
