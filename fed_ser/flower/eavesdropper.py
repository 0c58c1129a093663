"""The eavesdropping hook: a Flower strategy wrapper that records every client reply as the server receives it.

:class:`Eavesdropper` wraps the run's strategy the way Flower's DP wrappers do
(:mod:`flwr.serverapp.strategy.dp_fixed_clipping`) and sits outermost, so that it records what a
curious server holds, before anything the server runs itself (server-side clipping, noise on the
aggregate) touches it. Each valid reply goes to the :class:`~fed_ser.recording.recorder.UpdateRecorder`
in client order, with the global model of its round; the round is committed before aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_ser.recording.recorder import UpdateRecorder

#: What every training reply must carry: the aggregation weight, the local step count the
#: pseudo-gradient divides by, and which client sent it.
REQUIRED_METRICS = ("num-examples", "local-steps", "client-id")


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def reply_metrics(reply: Message) -> MetricRecord:
    """A training reply's metrics, checked: a missing one is an error naming the node (a silent
    default would, e.g., scale a FedAvg pseudo-gradient wrongly by the step count)."""
    metrics = reply.content.metric_records.get("metrics")
    missing = [k for k in REQUIRED_METRICS if metrics is None or k not in metrics]
    if missing:
        raise ValueError(f"the reply of node {reply.metadata.src_node_id} lacks the metric(s) {missing}")
    return metrics


def in_client_order(replies: Iterable[Message]) -> list[Message]:
    """Valid replies by client id, then the failed ones: replies arrive in whatever order the
    nodes finish, taken in client order the weighted sum (and the store) are the same in every run."""
    replies = list(replies)
    valid = sorted((m for m in replies if not m.has_error()), key=lambda m: int(reply_metrics(m)["client-id"]))
    return valid + [m for m in replies if m.has_error()]


class Eavesdropper(Strategy):
    """Records every client reply of ``strategy``'s rounds, then lets ``strategy`` aggregate them.

    ``round_offset`` numbers the rounds of a resumed run as the store does (round 1 of this
    process is round ``round_offset + 1`` of the run).
    """

    def __init__(self, strategy: Strategy, recorder: UpdateRecorder, round_offset: int = 0) -> None:
        super().__init__()
        self.strategy = strategy
        self.recorder = recorder
        self.round_offset = round_offset
        self._global: dict[str, np.ndarray] = {}

    def record(self, rnd: int, reply: Message, global_arrays: dict[str, np.ndarray]) -> None:
        """Append one reply of round ``rnd`` (sent the model ``global_arrays``) to the store."""
        metrics = reply_metrics(reply)
        self.recorder.record(
            round=rnd, client=int(metrics["client-id"]), node=reply.metadata.src_node_id,
            num_examples=int(metrics["num-examples"]), steps=int(metrics["local-steps"]),
            arrays=arrays_to_numpy(reply.content.array_records["arrays"]), global_arrays=global_arrays,
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays_to_numpy(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = in_client_order(replies)
        for reply in replies:
            if not reply.has_error():
                self.record(server_round + self.round_offset, reply, self._global)
        self.recorder.commit()
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
