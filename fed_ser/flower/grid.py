"""The ServerApp's grid, checking for replies every ``fl.poll_interval`` seconds.

Flower 1.41's deployed grid (``flwr.superlink.grid.http_grid``) pushes a round's messages, then
pulls the replies in a loop that sleeps a fixed 3 s between pulls: every deployed round, and each
of SecAgg+'s four message stages, waits up to 3 s after the last reply has arrived. This wrapper
keeps Flower's own ``push_messages`` and ``pull_messages`` and only waits less between them; every
other call and attribute is the wrapped grid's. Strategies, SecAgg+ and fed-ser's client discovery
all send through ``send_and_receive``, so all of them see the shorter wait. At the default 0.05 s a
waiting ServerApp asks the SuperLink 20 times a second (a local HTTPS call each).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class PromptGrid(Grid):
    """``grid`` with replies pulled every ``poll_interval`` seconds instead of Flower's fixed interval."""

    def __init__(self, grid: Grid, poll_interval: float) -> None:
        if not poll_interval > 0:
            raise ValueError(f"fl.poll_interval: must be > 0 seconds, got {poll_interval}")
        self.grid = grid
        self.poll_interval = poll_interval

    def set_run(self, run: Run) -> None:  # type: ignore[override]
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # type: ignore[override]
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def __getattr__(self, name: str):  # close(), the grid's node, ...: the wrapped grid's own
        if name == "grid":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all are in or ``timeout`` seconds have passed
        (``None``: wait for all), as Flower's grid does."""
        pending = set(self.grid.push_messages(messages))
        del messages  # as Flower's grid: the pushed messages (~1 MB each) are not held while waiting
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(self.poll_interval if deadline is None else max(0.0, min(self.poll_interval, deadline - time.monotonic())))
        return replies
