"""FedSGD / FedAvg on Flower's message-based FedAvg.

:class:`FedSerStrategy` subclasses :class:`flwr.serverapp.strategy.FedAvg` and keeps Flower's
messaging. Clients are selected by client id with the shared seeded schedule
(:func:`fed_ser.core.schedule.select_clients`) once the ServerApp has learnt which node holds which
client, so one seed trains the same clients as the in-process engines; without that map it
falls back to Flower's random node sampling. The eavesdropping recorder wraps this strategy
(:class:`fed_ser.flower.eavesdropper.Eavesdropper`), outside any of Flower's DP wrappers.
Aggregation is :func:`fed_ser.core.aggregation.aggregate`, the engines' too (Flower's weighted
average, operation for operation, then the server step):

* FedSGD: ``theta <- theta - lr * sum_k (n_k / N) g_k``;
* FedAvg, and FedSGD with model replies (under Flower's DP and SecAgg+, each client sends
  ``theta - lr g_k``): ``theta <- sum_k (n_k / N) theta_k``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fed_ser.core.aggregation import aggregate
from fed_ser.core.schedule import is_eval_round, select_clients
from fed_ser.flower.eavesdropper import arrays_to_numpy, in_client_order, numpy_to_arrays, reply_metrics


def _train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sample-weighted mean training loss and the number of replies (ids are not averaged)."""
    ms = [next(iter(r.metric_records.values())) for r in records]
    w = np.array([float(m[weight_key]) for m in ms])
    loss = np.array([float(m.get("train-loss", np.nan)) for m in ms])
    return MetricRecord({"train-loss": float(np.sum(w * loss) / w.sum()), "replies": len(ms)})


class FedSerStrategy(FedAvg):
    """FedAvg from Flower plus FedSGD's server step, a recorder and a round offset for resuming.

    Per round it keeps what the run's history needs (``rounds[rnd]``: clients sampled, replies,
    the clients that replied, training loss, client validation UAR).

    ``uniform_weights``: every reply weighs the same instead of its ``num-examples``. Flower's central DP
    wrappers calibrate their noise (``sigma C / m``) for the unweighted mean of ``m`` clipped replies; under
    FedAvg's example weights a client holding more than the average share moves the mean by more than
    ``C / m`` and its epsilon does not hold (``fed-ser-audit``'s example-weighted row: >= 29 against a
    claimed 10). The server app sets it whenever a central DP wrapper is on.
    """

    def __init__(self, *, algorithm: str, lr: float, model_replies: bool | None = None, eval_every: int = 1,
                 num_rounds: int = 1, round_offset: int = 0, client_nodes: dict[int, int] | None = None,
                 num_clients: int = 0, seed: int = 0, uniform_weights: bool = False, **kwargs):
        kwargs.setdefault("train_metrics_aggr_fn", _train_metrics)
        super().__init__(**kwargs)
        if algorithm not in ("fedsgd", "fedavg"):
            raise ValueError(f"fl.algorithm: unknown {algorithm!r}")
        self.algorithm = algorithm
        self.lr = lr
        self.model_replies = algorithm == "fedavg" if model_replies is None else model_replies
        self.eval_every = eval_every
        self.num_rounds = num_rounds
        self.round_offset = round_offset
        self.client_nodes = dict(client_nodes or {})
        self.num_clients = num_clients or len(self.client_nodes)
        self.seed = seed
        self.uniform_weights = uniform_weights
        self._global: dict[str, np.ndarray] = {}
        self.rounds: dict[int, dict] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays_to_numpy(arrays)
        config["lr"] = self.lr
        rnd = server_round + self.round_offset
        if not self.client_nodes:
            messages = list(super().configure_train(rnd, arrays, config, grid))
            self.rounds[rnd] = {"round": rnd, "sampled": len(messages)}
            return messages
        online = set(grid.get_node_ids())
        chosen = select_clients(self.seed, rnd, self.num_clients, self.fraction_train)
        config["server-round"] = rnd
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})  # one record, shared by all
        self.rounds[rnd] = {"round": rnd, "sampled": len(chosen)}  # a node that has gone away makes the round short
        return [Message(record, dst_node_id=self.client_nodes[p], message_type=MessageType.TRAIN)
                for p in chosen if self.client_nodes.get(p) in online]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        replies = in_client_order(replies)
        valid = [m for m in replies if not m.has_error()]
        log(INFO, "aggregate_train: round %s: %s replies, %s failures", rnd, len(valid), len(replies) - len(valid))
        for m in replies:
            if m.has_error():
                log(WARNING, "round %s: node %s replied with an error: %s", rnd, m.metadata.src_node_id, m.error.reason)
        clients = [int(reply_metrics(m)["client-id"]) for m in valid]
        agg, metrics = None, None
        if valid:
            updates = [arrays_to_numpy(m.content.array_records[self.arrayrecord_key]) for m in valid]
            for m, u in zip(valid, updates):
                if set(u) != set(self._global):
                    raise ValueError(f"round {rnd}: the reply of node {m.metadata.src_node_id} holds arrays {sorted(u)}, "
                                     f"the global model {sorted(self._global)}")
            weights = [1.0 if self.uniform_weights else reply_metrics(m)[self.weighted_by_key] for m in valid]
            algorithm = "fedavg" if self.model_replies else "fedsgd"
            agg = numpy_to_arrays(aggregate(self._global, updates, weights, algorithm, self.lr))
            metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        self.rounds.setdefault(rnd, {"round": rnd, "sampled": len(replies)}).update(
            replies=len(valid), clients=clients, train_loss=float(metrics["train-loss"]) if metrics else None)
        return agg, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        if not self.is_eval_round(rnd):
            return []
        return super().configure_evaluate(rnd, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        metrics = super().aggregate_evaluate(rnd, replies)
        if metrics is not None and "val-uar" in metrics:
            self.rounds.setdefault(rnd, {"round": rnd})["val_uar"] = float(metrics["val-uar"])
        return metrics

    def is_eval_round(self, rnd: int) -> bool:
        return is_eval_round(rnd, self.eval_every, self.num_rounds)
