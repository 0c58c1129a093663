"""The eavesdropper's record of one client update, independent of how it travelled.

:class:`UpdateRecorder` turns (round, client, node, update, global parameters) into store records:
FedSGD gradients as they are (sent as the one-step model ``theta - lr g``, under Flower's DP: stored
as ``(theta - theta_k) / lr``); FedAvg as ``theta(t) - theta_k(t)``; and, for both, the round's
global parameters once (the server sent them, so it knows them: the feature-space attack inverts
a gradient at the model it was computed at). The Flower strategy feeds it from Message replies;
the in-process engine feeds it directly, so both produce the same store format.

Records are committed a round at a time (group commit): :meth:`UpdateRecorder.record` appends
without an fsync and :meth:`UpdateRecorder.commit`, called once the round's replies are in, makes
them durable. A crash before it loses only the unfinished round, which a resumed run redoes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fed_ser.recording.store import UpdateStore


def select_layers(arrays: dict[str, np.ndarray], layers: list[str] | None) -> dict[str, np.ndarray]:
    """Keep the arrays of the chosen SER layers (``dense1`` keeps ``dense1.weight``/``.bias``)."""
    if layers is None:
        return arrays
    return {k: v for k, v in arrays.items() if k.split(".")[0] in layers}


@dataclass
class UpdateRecorder:
    store: UpdateStore
    algorithm: str
    lr: float
    layers: list[str] | None = None
    float16: bool = False
    model_replies: bool = False  # FedSGD clients send theta - lr g (see RunSettings.model_replies)
    _globals_written: set[int] = field(default_factory=set)

    def record(self, *, round: int, client: int, num_examples: int, steps: int, arrays: dict[str, np.ndarray],
               global_arrays: dict[str, np.ndarray], node: int = -1) -> None:
        """Record client ``client``'s reply of round ``round`` (``node``: the Flower node it came from, if any)."""
        meta = dict(round=round, node=node, client=client, num_examples=num_examples, steps=steps,
                    lr=self.lr, float16=self.float16, sync=False)
        self.record_global(round, global_arrays)
        if self.algorithm == "fedsgd":
            if self.model_replies:
                arrays = {k: (global_arrays[k] - arrays[k]) / np.float32(self.lr) for k in arrays}
            self.store.append(select_layers(arrays, self.layers), kind="gradient", **meta)
            return
        delta = {k: global_arrays[k] - arrays[k] for k in arrays}
        self.store.append(select_layers(delta, self.layers), kind="delta", **meta)

    def record_global(self, round: int, global_arrays: dict[str, np.ndarray]) -> None:
        """The global model round ``round`` starts from (once a round; the inversion's and the observer
        of aggregates' white-box view, and, under SecAgg+, all the server records)."""
        if round not in self._globals_written and self.store.global_record(round) is None:
            self.store.append(global_arrays, kind="global", round=round, node=-1, lr=self.lr, sync=False)
        self._globals_written.add(round)

    def record_aggregate(self, round: int, arrays: dict[str, np.ndarray], num_examples: int) -> None:
        """The round's mean reply as SecAgg+ unmasks it (``num_examples``: the total weight it reveals)."""
        self.store.append(select_layers(arrays, self.layers), kind="aggregate", round=round, node=-1,
                          num_examples=num_examples, lr=self.lr, sync=False)  # float32: it is differenced

    def commit(self) -> None:
        """Make the round's records durable: one fsync, then their index lines."""
        self.store.sync()
