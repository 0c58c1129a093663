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
from omegaconf import DictConfig

from defenses.privacy.audit import DIM, audit, canary_update
from defenses.privacy.central import central_epsilon, local_epsilon
from defenses.privacy.user_dp import UserDPConfig, privatize, server_epsilon, server_noise_multiplier
from fed_ser.experiments.config import console, load_config
from fed_ser.flower.audit import central_dp_canary, local_dp_canary
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.run.settings import ConfigError


def _no_dp(clip: float):
    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        u = canary_update(canary, clip)
        return float(u[0] * min(1.0, clip / np.linalg.norm(u)))
    return mechanism


def _user_dp(cfg: UserDPConfig):
    sigma = server_noise_multiplier(cfg, 1)
    old = {"w": np.zeros(DIM, np.float32)}

    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        return float(privatize({"w": canary_update(canary, cfg.clip)}, old, cfg.clip, sigma, rng)["w"][0])
    return mechanism, server_epsilon(sigma, 1, cfg.delta)


def run_audit(cfg: DictConfig) -> dict:
    """Audit every mechanism; write ``audit.md`` and ``audit.json`` under ``cfg.out_dir``."""
    a = cfg.audit
    trials, delta, clip, eps, sigma, m = int(a.trials), float(a.delta), float(a.clip), float(a.epsilon), float(a.noise_multiplier), int(a.clients)
    if m < 1:
        raise ConfigError(f"audit.clients: must be >= 1, got {m}")
    np.random.seed(int(a.seed))  # Flower's mechanisms draw their noise from numpy's global generator
    user, user_claim = _user_dp(UserDPConfig(eps, delta, clip))
    local, local_claim = local_dp_canary(clip, eps, delta), local_epsilon(eps, delta, 1)
    rows = [
        ("no DP (clipping only)", "server", _no_dp(clip), None),
        ("fed-ser user-level DP (dp=user)", "server", user, user_claim),
        ("Flower LocalDpMod (flower_dp=local)", "server", local, local_claim),
        ("Flower central DP, server-side fixed clipping", "observer of the aggregate",
         central_dp_canary(clip, sigma, m, "aggregate"), central_epsilon(sigma, 1, delta)),
        ("Flower central DP, server-side fixed clipping", "server", central_dp_canary(clip, sigma, m, "server"), None),
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
