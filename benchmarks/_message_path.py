"""Where a round of Flower's simulation engine goes: every message timed along Flower's own path.

Instrumentation for the benchmarks only (issue 20, item 4): while :func:`traced` is active, five of
Flower 1.41's own calls are wrapped to timestamp each message, nothing else changes:

1. ``InMemoryGrid.push_messages``: the ServerApp hands the round's messages to the in-memory state;
2. ``InMemoryLinkState.get_message_ins``: the engine's feeder thread picks a message up (it looks at
   every node's queue, then waits 0.1 s: ``vce_api.add_messages_to_queue``);
3. ``RayBackend.process_message`` start and end: a worker thread gives the message to a Ray actor,
   which runs the ClientApp (serialising the message there and the reply back);
4. ``InMemoryLinkState.store_message_res``: the reply is handed to the state (by a second thread,
   from a queue);
5. ``InMemoryGrid.pull_messages``: the ServerApp's grid finds the reply (fed-ser pulls every
   ``fl.poll_interval``, Flower's own grid every 0.1 s).

:func:`breakdown` turns the timestamps into milliseconds a round per stage.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("push", "pickup", "start", "end", "stored", "pulled")


@contextmanager
def traced() -> Iterator[dict[str, dict[str, float]]]:
    """Timestamps (``time.perf_counter``) of every message's stages, keyed by message id, while active."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    times: dict[str, dict[str, float]] = defaultdict(dict)
    lock = threading.Lock()

    def mark(message_ids, stage: str, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now  # one time for a call's messages: a round's pushes share theirs
        with lock:
            for i in message_ids:
                times[i].setdefault(stage, now)

    originals = {(InMemoryGrid, "push_messages"): InMemoryGrid.push_messages,
                 (InMemoryGrid, "pull_messages"): InMemoryGrid.pull_messages,
                 (InMemoryLinkState, "get_message_ins"): InMemoryLinkState.get_message_ins,
                 (InMemoryLinkState, "store_message_res"): InMemoryLinkState.store_message_res,
                 (RayBackend, "process_message"): RayBackend.process_message}

    def push(self, messages):
        now = time.perf_counter()  # before: the feeder may pick a message up while the rest are stored
        ids = list(originals[InMemoryGrid, "push_messages"](self, messages))
        mark(ids, "push", now)
        return ids

    def pull(self, message_ids):
        replies = list(originals[InMemoryGrid, "pull_messages"](self, message_ids))
        mark([r.metadata.reply_to_message_id for r in replies], "pulled")
        return replies

    def get_ins(self, *args, **kwargs):
        messages = originals[InMemoryLinkState, "get_message_ins"](self, *args, **kwargs)
        mark([m.metadata.message_id for m in messages], "pickup")
        return messages

    def store_res(self, message):
        mark([message.metadata.reply_to_message_id], "stored")
        return originals[InMemoryLinkState, "store_message_res"](self, message)

    def process(self, message, context):
        mark([message.metadata.message_id], "start")
        try:
            return originals[RayBackend, "process_message"](self, message, context)
        finally:
            mark([message.metadata.message_id], "end")

    wrappers = {"push_messages": push, "pull_messages": pull, "get_message_ins": get_ins,
                "store_message_res": store_res, "process_message": process}
    for (cls, name) in originals:
        setattr(cls, name, wrappers[name])
    try:
        yield times
    finally:
        for (cls, name), fn in originals.items():
            setattr(cls, name, fn)


def breakdown(times: dict[str, dict[str, float]]) -> dict[str, float]:
    """Milliseconds a round: the round's wall time from its push to its last reply pulled, and the
    median message's wait at each stage; plus the server's own time between rounds.

    Rounds are the groups of messages pushed together. ``clientapp_serial_ms`` is the sum of the
    round's ClientApp calls (Ray actors run them side by side, up to one per CPU).
    """
    complete = [t for t in times.values() if all(s in t for s in STAGES)]
    rounds: dict[float, list[dict[str, float]]] = defaultdict(list)
    for t in complete:
        rounds[t["push"]].append(t)
    order = sorted(rounds)
    if len(order) < 2:
        raise ValueError("fewer than two complete rounds were traced")
    med = lambda xs: 1000 * statistics.median(xs)
    per = [rounds[p] for p in order]
    walls = [max(t["pulled"] for t in r) - r[0]["push"] for r in per]
    between = [order[i + 1] - max(t["pulled"] for t in per[i]) for i in range(len(per) - 1)]
    flat = [t for r in per for t in r]
    return {
        "rounds": len(per),
        "messages_per_round": statistics.median(len(r) for r in per),  # the discovery query is one "round" too
        "round_ms": med([w + b for w, b in zip(walls, between)]),
        "messages_ms": med(walls),  # push -> last reply pulled
        "server_between_rounds_ms": med(between),  # aggregation, recording, evaluation, the next round's messages
        "pickup_wait_ms": med([t["pickup"] - t["push"] for t in flat]),  # the engine's 0.1 s feeder poll
        "queue_wait_ms": med([t["start"] - t["pickup"] for t in flat]),  # for a free worker / actor
        "clientapp_call_ms": med([t["end"] - t["start"] for t in flat]),  # Ray call: serialise, run, reply
        "clientapp_serial_ms": med([sum(t["end"] - t["start"] for t in r) for r in per]),
        "store_ms": med([t["stored"] - t["end"] for t in flat]),
        "pull_wait_ms": med([t["pulled"] - t["stored"] for t in flat]),  # the ServerApp's poll
    }
