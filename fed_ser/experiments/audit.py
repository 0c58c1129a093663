"""Empirical privacy auditing of the DP mechanisms in one command: audited epsilon beside the claimed one.

``fed-ser-audit`` runs each mechanism on two neighbouring inputs many times (a canary client whose
clipped update points one way, or the other way: the replace-one neighbours the accounting
assumes) and reports the lower bound on epsilon the outputs prove
(:func:`defenses.privacy.audit.audit`) beside the epsilon the mechanism claims, per observer:

* fed-ser's user-level DP (``dp=user``), against the server;
* Flower's ``LocalDpMod`` (``flower_dp=local``), against the server;
* Flower's central DP with server-side fixed clipping (``flower_dp=central_fixed``), against an
  observer of the aggregate (one round of ``clients`` clients) and against the server itself (which
  receives the canary's update before any noise: its claim is none);
* no DP (clipping only): the bound must be well above zero.

Flower's mechanisms run as shipped (the mod and the strategy wrapper, on Messages). Results:
``<out_dir>/audit.md`` and ``audit.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import DictConfig

from defenses.privacy.audit import audit
from defenses.privacy.central import central_epsilon, local_epsilon
from defenses.privacy.user_dp import UserDPConfig, privatize, server_epsilon, server_noise_multiplier
from fed_ser.core.settings import ConfigError
from fed_ser.experiments.config import console, load_config
from fed_ser.io import atomic_write_json, atomic_write_text

DIM = 16  # the audited update's size: the canary direction is its first coordinate


def _arrays(v: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.ascontiguousarray(v, dtype=np.float32))})


def _canary_update(canary: bool, clip: float) -> np.ndarray:
    """The canary client's update: ten times the clip along e_1, or against it (clipped: +-C e_1)."""
    u = np.zeros(DIM)
    u[0] = (10.0 if canary else -10.0) * clip
    return u


class _Grid:
    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _no_dp(clip: float):
    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        u = _canary_update(canary, clip)
        return float(u[0] * min(1.0, clip / np.linalg.norm(u)))
    return mechanism


def _user_dp(cfg: UserDPConfig):
    sigma = server_noise_multiplier(cfg, 1)
    old = {"w": np.zeros(DIM, np.float32)}

    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        return float(privatize({"w": _canary_update(canary, cfg.clip)}, old, cfg.clip, sigma, rng)["w"][0])
    return mechanism, server_epsilon(sigma, 1, cfg.delta)


def _local_dp(clip: float, epsilon: float, delta: float):
    mod = LocalDpMod(clip, 2.0 * clip, epsilon, delta)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    theta = np.zeros(DIM, np.float32)

    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        msg = Message(RecordDict({"arrays": _arrays(theta), "config": ConfigRecord({})}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        reply = lambda m, c: Message(RecordDict({"arrays": _arrays(theta + _canary_update(canary, clip))}), reply_to=m)
        return float(mod(msg, ctx, reply).content.array_records["arrays"]["w"].numpy()[0])
    return mechanism, local_epsilon(epsilon, delta, 1)


def _central_dp(clip: float, noise_multiplier: float, clients: int, observer: str):
    """One round of Flower's server-side fixed clipping with ``clients`` clients, the canary among them.

    ``observer="aggregate"`` scores the new global model; ``"server"`` scores the canary's reply as
    the server receives it, before the wrapper clips and adds noise."""
    theta = np.zeros(DIM, np.float32)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        wrapper = DifferentialPrivacyServerSideFixedClipping(
            FedAvg(min_train_nodes=clients, min_available_nodes=clients), noise_multiplier, clip, clients)
        msgs = list(wrapper.configure_train(1, _arrays(theta), ConfigRecord({}), _Grid(clients)))
        # the others are known to the auditor; not zero: Flower 1.41 divides by a zero update's norm when it clips
        other = np.zeros(DIM)
        other[1] = 0.01 * clip
        updates = [_canary_update(canary, clip)] + [other] * (clients - 1)
        replies = [Message(RecordDict({"arrays": _arrays(theta + u), "metrics": MetricRecord({"num-examples": 10})}),
                           reply_to=m) for m, u in zip(msgs, updates)]
        if observer == "server":
            return float(replies[0].content.array_records["arrays"]["w"].numpy()[0])
        agg, _ = wrapper.aggregate_train(1, replies)
        return float(agg["w"].numpy()[0])
    return mechanism


def run_audit(cfg: DictConfig) -> dict:
    """Audit every mechanism; write ``audit.md`` and ``audit.json`` under ``cfg.out_dir``."""
    a = cfg.audit
    trials, delta, clip, eps, sigma, m = int(a.trials), float(a.delta), float(a.clip), float(a.epsilon), float(a.noise_multiplier), int(a.clients)
    if m < 1:
        raise ConfigError(f"audit.clients: must be >= 1, got {m}")
    np.random.seed(int(a.seed))  # Flower's mechanisms draw their noise from numpy's global generator
    user, user_claim = _user_dp(UserDPConfig(eps, delta, clip))
    local, local_claim = _local_dp(clip, eps, delta)
    rows = [
        ("no DP (clipping only)", "server", _no_dp(clip), None),
        ("fed-ser user-level DP (dp=user)", "server", user, user_claim),
        ("Flower LocalDpMod (flower_dp=local)", "server", local, local_claim),
        ("Flower central DP, server-side fixed clipping", "observer of the aggregate",
         _central_dp(clip, sigma, m, "aggregate"), central_epsilon(sigma, 1, delta)),
        ("Flower central DP, server-side fixed clipping", "server", _central_dp(clip, sigma, m, "server"), None),
    ]
    results = []
    for i, (name, observer, mechanism, claimed) in enumerate(rows):
        r = audit(mechanism, trials, delta, seed=int(a.seed) + i, alpha=float(a.alpha))
        results.append({"mechanism": name, "observer": observer, "claimed_epsilon": claimed, **r})
        print(f"[audit] {name}, {observer}: audited epsilon >= {r['epsilon_lower_bound']:.2f} "
              f"(claimed {'none' if claimed is None else f'{claimed:.2f}'}; at most {r['most_measurable']:.2f} measurable "
              f"with {r['runs_per_side']} runs a side)", flush=True)
    out = Path(cfg.out_dir)
    summary = {"trials": trials, "delta": delta, "clip": clip, "epsilon": eps, "noise_multiplier": sigma, "clients": m,
               "alpha": float(a.alpha), "rows": results}
    atomic_write_json(out / "audit.json", summary)
    lines = ["# Empirical privacy audit", "",
             f"One participation; canary: a client whose update is clipped to +-{clip} along one direction (replace-one "
             f"neighbours); {trials} runs per side, threshold chosen on half, rates counted on the other half, "
             f"Clopper-Pearson at {100 * (1 - float(a.alpha)):.0f}% confidence; delta {delta}.", "",
             "| mechanism | observer | claimed epsilon | audited epsilon (lower bound) | most measurable |", "|---|---|---|---|---|"]
    for r in results:
        claim = "none" if r["claimed_epsilon"] is None else f"{r['claimed_epsilon']:.2f}"
        lines.append(f"| {r['mechanism']} | {r['observer']} | {claim} | {r['epsilon_lower_bound']:.2f} | {r['most_measurable']:.2f} |")
    atomic_write_text(out / "audit.md", "\n".join(lines) + "\n")
    print(f"[audit] {out / 'audit.md'}", flush=True)
    return summary



@console
def main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-audit key=value ...`` (conf/audit.yaml)."""
    run_audit(load_config(list(sys.argv[1:] if argv is None else argv), "audit"))


if __name__ == "__main__":
    main()
