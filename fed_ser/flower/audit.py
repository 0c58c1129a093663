"""Flower's DP mechanisms, as shipped, on the empirical audit's canary client (:mod:`defenses.privacy.audit`).

Each function returns ``mechanism(canary, rng) -> score``: one run of the mechanism on the
neighbouring input with (``canary=True``) or without the canary, scored along the canary's
direction, as :func:`defenses.privacy.audit.audit` reads it. Flower draws its noise from numpy's
global generator (seed it before an audit).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from defenses.privacy.audit import DIM, canary_update


def _audit_arrays(v: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.ascontiguousarray(v, dtype=np.float32))})


class _AuditGrid:
    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def local_dp_canary(clip: float, epsilon: float, delta: float) -> Callable[[bool, np.random.Generator], float]:
    """The audit's view of ``LocalDpMod(clip, 2 clip, epsilon, delta)`` on the canary client (see :mod:`defenses.privacy.audit`)."""
    mod = LocalDpMod(clip, 2.0 * clip, epsilon, delta)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    theta = np.zeros(DIM, np.float32)

    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        msg = Message(RecordDict({"arrays": _audit_arrays(theta), "config": ConfigRecord({})}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        reply = lambda m, c: Message(RecordDict({"arrays": _audit_arrays(theta + canary_update(canary, clip))}), reply_to=m)
        return float(mod(msg, ctx, reply).content.array_records["arrays"]["w"].numpy()[0])
    return mechanism


def central_dp_canary(clip: float, noise_multiplier: float, clients: int, observer: str,
                      canary_examples: int = 10) -> Callable[[bool, np.random.Generator], float]:
    """One round of Flower's server-side fixed clipping with ``clients`` clients, the canary among them.

    ``observer="aggregate"`` scores the new global model; ``"server"`` scores the canary's reply as
    the server receives it, before the wrapper clips and adds noise. Every other client reports 10
    examples, the canary ``canary_examples``: FedAvg weighs the replies by them, while Flower's noise
    (``sigma C / clients``) is calibrated for the unweighted mean."""
    theta = np.zeros(DIM, np.float32)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        wrapper = DifferentialPrivacyServerSideFixedClipping(
            FedAvg(min_train_nodes=clients, min_available_nodes=clients), noise_multiplier, clip, clients)
        msgs = list(wrapper.configure_train(1, _audit_arrays(theta), ConfigRecord({}), _AuditGrid(clients)))
        # the others are known to the auditor; not zero: Flower 1.41 divides by a zero update's norm when it clips
        other = np.zeros(DIM)
        other[1] = 0.01 * clip
        updates = [canary_update(canary, clip)] + [other] * (clients - 1)
        examples = [canary_examples] + [10] * (clients - 1)
        replies = [Message(RecordDict({"arrays": _audit_arrays(theta + u), "metrics": MetricRecord({"num-examples": n})}),
                           reply_to=m) for m, u, n in zip(msgs, updates, examples)]
        if observer == "server":
            return float(replies[0].content.array_records["arrays"]["w"].numpy()[0])
        agg, _ = wrapper.aggregate_train(1, replies)
        return float(agg["w"].numpy()[0])
    return mechanism
