"""Canary clients in fed-ser's own Flower run: the one-run privacy audit's measurements.

A one-run audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run") puts
many canaries in one training run, each on a side drawn with probability 1/2, and asks how well the
run's outputs tell the sides apart (:func:`defenses.privacy.audit.one_run_epsilon`). In federated
learning the canaries are clients (Andrew et al., ICLR 2024, "One-shot empirical privacy estimation
for federated learning"): canary ``k`` holds a secret random unit direction ``u_k`` over the model's
parameters and, in place of training, sends the update ``b_k * scale * u_k``, with its side
``b_k`` in {+1, -1} (``scale``: ten times the clip, so every clip saturates). The two sides of a canary
are replace-one neighbours, the relation the DP claims are made for; a canary left out of a round
instead would show itself to the server by its missing reply.

The canaries are clients of the run's data set (:func:`with_canaries`: client ids after the real
ones, with rows of their own), so the shared schedule selects them, the DP noise is calibrated for
them and FedAvg weighs them as any client; their update goes through the run's defences as any
client's does (:func:`fed_ser.run.client.client_update`'s ``local``: ``dp=user``'s clipping and noise,
Flower's client mods, Flower's server-side wrappers). Each observer scores canary ``k`` by cosines with
``u_k`` (Andrew et al.'s statistic), from fed-ser's own records of the run (:func:`canary_scores`):

* **server**: what the curious server received from the canary (the eavesdropper's
  :class:`~fed_ser.recording.store.UpdateStore`): ``sum_r cos(reply_r - theta_{r-1}, u_k)``;
* **aggregate**: every global model (the store's global records, the final checkpoint):
  ``sum_r cos(theta_r - theta_{r-1}, u_k)``;
* **final model**: ``cos(theta_R - theta_0, u_k)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fed_ser.core.training import LocalResult
from fed_ser.data.federated import TRAIN, VAL, FederatedData
from fed_ser.recording.checkpoint import NAME as CHECKPOINT
from fed_ser.recording.checkpoint import load_checkpoint
from fed_ser.recording.store import UpdateStore

OBSERVERS = ("server", "aggregate", "final model")


@dataclass(frozen=True)
class CanaryClients:
    """``count`` canary clients, client ids ``first .. first + count - 1``; directions and sides drawn from ``seed``."""

    first: int
    count: int
    seed: int
    scale: float  # the raw update's norm (ten times the clip: every clip saturates)

    def holds(self, client: int) -> bool:
        return self.first <= client < self.first + self.count

    def sides(self) -> np.ndarray:
        """Each canary's side, +1 or -1, each with probability 1/2 (the audit's secret)."""
        return np.random.default_rng([self.seed, 1]).choice(np.array([-1, 1]), size=self.count)

    def direction(self, k: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Canary ``k``'s unit direction over the parameters of ``like`` (isotropic: Gaussian, normalised)."""
        rng = np.random.default_rng([self.seed, 2, k])
        u = {name: rng.standard_normal(np.shape(v)) for name, v in like.items()}
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in u.values()))
        return {name: a / norm for name, a in u.items()}

    def local(self, client: int) -> Callable[..., LocalResult]:
        """The local loop of canary client ``client`` (:func:`fed_ser.core.training.local_update`'s signature):
        the parameters ``theta + b scale u`` (FedAvg) or the gradient whose server step is that (FedSGD)."""
        k = client - self.first
        side = int(self.sides()[k])

        def canary_update(model: nn.Module, X: np.ndarray, y: np.ndarray, *, algorithm: str, lr: float, **_) -> LocalResult:
            theta = {name: v.detach().cpu().numpy() for name, v in model.state_dict().items()}
            step = {name: side * self.scale * u for name, u in self.direction(k, theta).items()}
            if algorithm == "fedavg":
                arrays = {name: (theta[name] + step[name]).astype(np.float32) for name in theta}
            else:
                arrays = {name: (-step[name] / lr).astype(np.float32) for name in theta}
            return LocalResult(arrays=arrays, num_examples=len(X), steps=1, loss=float("nan"))
        return canary_update


def with_canaries(data: FederatedData, count: int, rows: int, scale: float, seed: int = 0) -> tuple[FederatedData, CanaryClients]:
    """``data`` with ``count`` canary clients after its own (``rows`` training rows and one validation row each, drawn
    at random: the rows set the canary's FedAvg weight, not its update), and the canaries (update norm ``scale``)."""
    if count < 2:
        raise ValueError(f"audit.one_run.canaries: at least 2, got {count}")
    rng = np.random.default_rng([seed, 3])
    n, d = data.num_clients, data.X.shape[1]
    per = rows + 1
    X = rng.standard_normal((count * per, d)).astype(data.X.dtype)
    y = rng.integers(0, int(data.y.max()) + 1, count * per)
    client = np.repeat(np.arange(n, n + count), per)
    split = np.tile(np.array([TRAIN] * rows + [VAL], dtype=data.split.dtype), count)
    out = FederatedData(X=np.concatenate([data.X, X]), y=np.concatenate([data.y, y]).astype(data.y.dtype),
                        client=np.concatenate([data.client, client]).astype(data.client.dtype),
                        split=np.concatenate([data.split, split]),
                        client_speaker=np.concatenate([data.client_speaker, [f"canary{k}" for k in range(count)]]),
                        client_gender=np.concatenate([data.client_gender, ["-"] * count]),
                        client_corpus=np.concatenate([data.client_corpus, ["canary"] * count]))
    return out, CanaryClients(first=n, count=count, seed=seed, scale=scale)


def _flat(arrays: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in names])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def canary_scores(canaries: CanaryClients, recorder_dir: str | Path, out_dir: str | Path) -> dict[str, np.ndarray]:
    """Each observer's score of each canary (see the module) from a finished run's records: the eavesdropper's
    store in ``recorder_dir`` (the replies and the global model of each round) and the final checkpoint in ``out_dir``."""
    store = UpdateStore(recorder_dir)
    rounds, final = load_checkpoint(Path(out_dir) / CHECKPOINT)
    names = list(final)
    models = []
    for r in range(1, rounds + 1):
        g = store.global_record(r)
        if g is None:
            raise ValueError(f"{recorder_dir}: no global model recorded for round {r} (record the whole run: recorder.layers=all)")
        models.append(_flat(store.read(g), names))
    models.append(_flat(final, names))
    steps = [models[r + 1] - models[r] for r in range(rounds)]
    total = models[-1] - models[0]
    replies: dict[int, list] = {}
    for info in store.updates():
        if canaries.holds(info.client):
            replies.setdefault(info.client, []).append(info)
    scores = {o: np.zeros(canaries.count) for o in OBSERVERS}
    for k in range(canaries.count):
        u = _flat(canaries.direction(k, final), names)
        # the store keeps theta - reply (FedAvg) or (theta - reply) / lr (FedSGD): minus the update either way
        scores["server"][k] = sum(_cos(-_flat(store.read(i), names), u) for i in replies.get(canaries.first + k, []))
        scores["aggregate"][k] = sum(_cos(s, u) for s in steps)
        scores["final model"][k] = _cos(total, u)
    return scores
