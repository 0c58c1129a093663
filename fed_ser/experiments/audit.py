"""Empirical privacy auditing of the DP mechanisms in one command: audited epsilon beside the claimed one.

``fed-ser-audit`` does two audits (:mod:`defenses.privacy.audit` says what each bound assumes):

**Per mechanism** (:func:`audit_mechanisms`): each mechanism runs ``audit.trials`` times on each of two
neighbouring inputs (a canary client whose clipped update points one way, or the other way: the
replace-one neighbours the claims are made for), scored along the canary's direction. Two lower
bounds read the same scores: Clopper-Pearson (no assumption) and the Gaussian-DP fit (scores
Gaussian with one variance: true for these mechanisms, and checked). Each is set beside the
mechanism's claim from the tightest accountant (exact: one unsubsampled Gaussian release) and from
RDP, the accountant the mechanisms calibrate with:

* fed-ser's user-level DP (``dp=user``), against the server;
* Flower's ``LocalDpMod`` (``flower_dp=local``), against the server;
* Flower's central DP with server-side fixed clipping (``flower_dp=central_fixed``), against an
  observer of the aggregate (one round of ``audit.clients`` clients) and against the server itself
  (which receives the canary's update before any noise: its claim is none); and once more with the
  canary holding four times each other client's examples: fed-ser's FedAvg weighs replies by their
  examples, Flower's noise is calibrated for the unweighted mean, so the claim does not hold there;
* no DP (clipping only).

**One run** (:func:`audit_one_run`): fed-ser's own Flower simulation (its ServerApp, ClientApp,
eavesdropper and the DP of ``audit.one_run.modes``), with ``audit.one_run.canaries`` canary clients
beside ``audit.one_run.clients`` real ones, each canary on a side drawn with probability 1/2
(:mod:`fed_ser.flower.canary`), scored by the server, an observer of the global models and the final
model; the one-run bound (Steinke, Nasr & Jagielski 2023) and the Gaussian-DP fit of the canaries'
scores beside each observer's claim. Every client takes part in every round (``fl.fraction=1``), so
each canary's claim is ``audit.one_run.rounds`` unsubsampled Gaussian releases.

Flower's mechanisms run as shipped. Results: ``<out_dir>/audit.md`` and ``audit.json``.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from defenses.privacy.accounting import spent, tightest_spent
from defenses.privacy.audit import DIM, audit, canary_update, gdp_lower_bound, one_run_epsilon
from defenses.privacy.central import local_noise_multiplier
from defenses.privacy.user_dp import UserDPConfig, privatize, server_noise_multiplier
from fed_ser.data.federated import TEST, TRAIN, VAL, FederatedData
from fed_ser.experiments.config import console, load_config
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.run.settings import ConfigError, RunSettings

EXACT = "exact (analytic Gaussian)"
WEIGHTED = "Flower central DP, server-side fixed clipping, FedAvg weights: the canary holds 4x each other client's examples"


@dataclass(frozen=True)
class Mechanism:
    """One audited mechanism and observer: ``run(canary, rng) -> score``; its claim is one Gaussian release of noise
    multiplier ``noise_multiplier`` (noise std over the replace-one sensitivity), or none."""

    name: str
    observer: str
    run: Callable[[bool, np.random.Generator], float]
    noise_multiplier: float | None


def claims(noise_multiplier: float | None, steps: int, delta: float) -> dict:
    """The claimed epsilon of ``steps`` unsubsampled Gaussian releases: tightest accountant (exact) and RDP."""
    if noise_multiplier is None:
        return {"claimed_epsilon": None, "claimed_epsilon_rdp": None, "accountant": None}
    return {"claimed_epsilon": tightest_spent(noise_multiplier, 1.0, steps, delta),
            "claimed_epsilon_rdp": spent(noise_multiplier, 1.0, steps, delta), "accountant": EXACT}


def _no_dp(clip: float):
    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        u = canary_update(canary, clip)
        return float(u[0] * min(1.0, clip / np.linalg.norm(u)))
    return mechanism


def _user_dp(cfg: UserDPConfig) -> tuple[Callable[[bool, np.random.Generator], float], float]:
    """fed-ser's user-level DP on the canary, and its noise multiplier against the server (sigma over sensitivity 2C)."""
    sigma = server_noise_multiplier(cfg, 1)
    old = {"w": np.zeros(DIM, np.float32)}

    def mechanism(canary: bool, rng: np.random.Generator) -> float:
        return float(privatize({"w": canary_update(canary, cfg.clip)}, old, cfg.clip, sigma, rng)["w"][0])
    return mechanism, sigma / 2.0


def audit_mechanisms(a: DictConfig) -> list[Mechanism]:
    """The per-mechanism audit's rows for the ``audit`` config ``a``."""
    from fed_ser.flower.audit import central_dp_canary, local_dp_canary  # Flower loads only for an audit

    delta, clip, eps, sigma, m = float(a.delta), float(a.clip), float(a.epsilon), float(a.noise_multiplier), int(a.clients)
    if m < 1:
        raise ConfigError(f"audit.clients: must be >= 1, got {m}")
    user, user_z = _user_dp(UserDPConfig(eps, delta, clip))
    central = "Flower central DP, server-side fixed clipping"
    return [
        Mechanism("no DP (clipping only)", "server", _no_dp(clip), None),
        Mechanism("fed-ser user-level DP (dp=user)", "server", user, user_z),
        Mechanism("Flower LocalDpMod (flower_dp=local)", "server", local_dp_canary(clip, eps, delta), local_noise_multiplier(eps, delta)),
        Mechanism(central, "observer of the aggregate", central_dp_canary(clip, sigma, m, "aggregate"), sigma / 2.0),
        Mechanism(central, "server", central_dp_canary(clip, sigma, m, "server"), None),
        # fed-ser's FedAvg weighs replies by their examples; Flower's noise is calibrated for the unweighted mean
        Mechanism(WEIGHTED, "observer of the aggregate", central_dp_canary(clip, sigma, m, "aggregate", canary_examples=40), sigma / 2.0),
    ]


def audit_mechanism(mech: Mechanism, trials: int, delta: float, seed: int, alpha: float) -> dict:
    """One row of the per-mechanism audit: both bounds, both claims, the runs and the seconds they took."""
    t0 = time.perf_counter()
    r = audit(mech.run, trials, delta, seed=seed, alpha=alpha)
    return {"mechanism": mech.name, "observer": mech.observer, **claims(mech.noise_multiplier, 1, delta), **r,
            "runs_per_side": trials, "seconds": time.perf_counter() - t0}


# ---- the one-run audit in fed-ser's Flower simulation ------------------------------------------------------

ONE_RUN_MODES = ("none", "user", "central-fixed", "client-fixed", "local")


def synthetic_federation(clients: int, rows: int, features: int, seed: int) -> FederatedData:
    """The real clients of the audited run: ``rows`` training rows and one validation row each, random features
    (DP must hold whatever the data; equal rows give every client, canaries included, the same FedAvg weight)."""
    rng = np.random.default_rng([seed, 4])
    per = rows + 1
    n = clients * per + 20
    client = np.concatenate([np.repeat(np.arange(clients), per), np.full(20, -1)])
    split = np.concatenate([np.tile(np.array([TRAIN] * rows + [VAL], np.int8), clients), np.full(20, TEST, np.int8)])
    return FederatedData(X=rng.standard_normal((n, features)).astype(np.float32), y=rng.integers(0, 4, n), client=client,
                         split=split, client_speaker=np.array([f"s{i}" for i in range(clients)]),
                         client_gender=np.array(["F", "M"] * (clients // 2) + ["F"] * (clients % 2)),
                         client_corpus=np.array(["synthetic"] * clients))


def _one_run_settings(mode: str, a: DictConfig, prepared: Path, work: Path) -> RunSettings:
    o = a.one_run
    common = dict(prepared=str(prepared), algorithm="fedavg", rounds=int(o.rounds), fraction=1.0, lr=0.05, local_epochs=1,
                  batch_size=4, optimizer="sgd", eval_every=int(o.rounds), eval_fraction=0.01, recorder_dir=str(work / "updates"),
                  recorder_layers="all", out_dir=str(work / "run"), resume=False, seed=int(a.seed))
    clip, delta = float(a.clip), float(a.delta)
    if mode == "user":
        return RunSettings(**common, dp_mode="user", dp_epsilon=float(a.epsilon), dp_delta=delta, dp_clip=clip)
    if mode == "none":
        return RunSettings(**common)
    return RunSettings(**common, flower_dp_mode=mode, flower_dp_noise=float(a.noise_multiplier), flower_dp_clip=clip,
                       flower_dp_epsilon=float(a.epsilon), flower_dp_delta=delta)


def one_run_noise_multipliers(s: RunSettings, clients: int, client: int) -> dict[str, float | None]:
    """Per observer, the noise multiplier of one round's release about canary ``client`` (noise std over the
    replace-one sensitivity), with ``clients`` clients a round, uniform FedAvg weights and no subsampling; None: no claim."""
    if s.dp_mode == "user":
        from fed_ser.run.privacy import dp_steps

        sigma = server_noise_multiplier(s.privacy(), dp_steps(s, client, clients))  # the canary's own calibration
        # the mean of the round's replies: the canary's 2C / M against the M clients' noise, sigma C / sqrt(M)
        return {"server": sigma / 2.0, "aggregate": sigma * math.sqrt(clients) / 2.0, "final model": sigma * math.sqrt(clients) / 2.0}
    if s.flower_dp_mode in ("central-fixed", "client-fixed"):
        return {"server": None, "aggregate": s.flower_dp_noise / 2.0, "final model": s.flower_dp_noise / 2.0}
    if s.flower_dp_mode == "local":
        z = local_noise_multiplier(s.flower_dp_epsilon, s.flower_dp_delta)
        return {"server": z, "aggregate": z * math.sqrt(clients), "final model": z * math.sqrt(clients)}
    return {"server": None, "aggregate": None, "final model": None}


def check_audit_config(a: DictConfig) -> None:
    """Refuse, before any run, settings the audit cannot use (:class:`ConfigError` naming the key)."""
    if int(a.trials) < 20:
        raise ConfigError(f"audit.trials: {a.trials} runs cannot bound anything; use >= 20")
    if not 0 < float(a.alpha) < 1 or not 0 < float(a.delta) < 1:
        raise ConfigError(f"audit.alpha and audit.delta: must be in (0, 1), got {a.alpha} and {a.delta}")
    o = a.one_run
    for mode in o.modes:
        if mode not in ONE_RUN_MODES:
            raise ConfigError(f"audit.one_run.modes: {mode!r} is not one of {ONE_RUN_MODES}")
    for key, least in (("canaries", 2), ("clients", 1), ("rows", 1), ("features", 1), ("rounds", 1)):
        if int(o[key]) < least:
            raise ConfigError(f"audit.one_run.{key}: must be >= {least}, got {o[key]}")
    if "user" in o.modes:
        from defenses.privacy.user_dp import check_delta

        try:
            check_delta(float(a.delta), int(o.clients) + int(o.canaries))
        except ValueError as exc:
            raise ConfigError(str(exc).replace("dp.delta", "audit.delta")) from None


def audit_one_run(mode: str, a: DictConfig, out: Path) -> list[dict]:
    """Run fed-ser's Flower simulation under ``mode`` with canary clients; one row per observer."""
    from fed_ser.flower.canary import OBSERVERS, canary_scores, with_canaries
    from fed_ser.flower.client_app import make_client_app
    from fed_ser.flower.simulation import simulate

    o = a.one_run
    work = out / "one_run" / mode
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data, canaries = with_canaries(synthetic_federation(int(o.clients), int(o.rows), int(o.features), int(a.seed)), int(o.canaries),
                                   int(o.rows), 10.0 * float(a.clip), seed=int(a.seed))
    data.save(work / "data.npz")
    s = _one_run_settings(mode, a, work / "data.npz", work)
    t0 = time.perf_counter()
    simulate(s, data.num_clients, client_app=make_client_app(s, canaries))
    run_seconds = time.perf_counter() - t0
    scores = canary_scores(canaries, s.recorder_dir, s.out_dir)
    shutil.rmtree(s.recorder_dir)  # every reply of every round: the scores are what the audit keeps
    sides = canaries.sides()
    z = one_run_noise_multipliers(s, data.num_clients, canaries.first)
    rows = []
    for observer in OBSERVERS:
        sc = scores[observer]
        rows.append({"mode": mode, "observer": observer, "canaries": canaries.count, "clients": data.num_clients,
                     "rounds": s.rounds, **claims(z[observer], s.rounds, float(a.delta)),
                     **one_run_epsilon(sc, sides, float(a.delta), float(a.alpha)),
                     **gdp_lower_bound(sc[sides == 1], sc[sides == -1], float(a.delta), float(a.alpha)),
                     "run_seconds": run_seconds, "seconds": time.perf_counter() - t0})
    np.savez(work / "scores.npz", sides=sides, **{k.replace(" ", "_"): v for k, v in scores.items()})
    return rows


# ---- the report ---------------------------------------------------------------------------------------------

def _f(x: float | None) -> str:
    return "none" if x is None else ("inf" if math.isinf(x) else f"{x:.2f}")


def _ratio(bound: float | None, claim: float | None) -> str:
    return "" if bound is None or not claim else f"{bound / claim:.2f}"


def report(summary: dict) -> str:
    """``audit.md``: each bound beside its claim, what it cost."""
    a = summary
    lines = ["# Empirical privacy audit", "",
             f"delta {a['delta']}; every bound at {100 * (1 - a['alpha']):.0f}% confidence; claims from the tightest "
             "accountant (exact: the analytic Gaussian mechanism) and from RDP.", "",
             "## Per mechanism", "",
             f"One release; canary: a client whose update is clipped to +-{a['clip']} along one direction, or the other "
             f"(replace-one neighbours); {a['trials']} runs a side. Clopper-Pearson: threshold chosen on half, rates counted on "
             "the other half, no assumption. GDP fit: assumes Gaussian scores of one variance (p-values of that check shown; "
             "n/a: the scores do not vary).", "",
             "| mechanism | observer | claimed epsilon (exact) | claimed (RDP) | Clopper-Pearson bound | GDP bound | GDP / claim "
             "| normality p, equal variance p | runs a side | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in a["rows"]:
        check = "" if r["gdp_normality_p"] is None else f"{r['gdp_normality_p']:.2f}, {r['gdp_equal_variance_p']:.2f}"
        gdp = "n/a" if r["gdp_epsilon_lower_bound"] is None else _f(r["gdp_epsilon_lower_bound"])
        lines.append(f"| {r['mechanism']} | {r['observer']} | {_f(r['claimed_epsilon'])} | {_f(r['claimed_epsilon_rdp'])} | "
                     f"{_f(r['epsilon_lower_bound'])} (at most {_f(r['most_measurable'])}) | {gdp} | "
                     f"{_ratio(r['gdp_epsilon_lower_bound'], r['claimed_epsilon'])} | {check} | {r['runs_per_side']} | {r['seconds']:.1f} |")
    if a.get("one_run"):
        o = a["one_run"][0]
        lines += ["", "## One run: canary clients in fed-ser's Flower simulation", "",
                  f"{o['canaries']} canary clients among {o['clients']} (each on a side drawn with probability 1/2), "
                  f"{o['rounds']} rounds, every client every round; scores: cosines with each canary's direction "
                  "(Andrew et al. 2024). One-run bound: Steinke, Nasr & Jagielski 2023, no assumption. GDP fit: assumes "
                  "the canaries' scores are independent Gaussians of one variance.", "",
                  "| DP | observer | claimed epsilon (exact) | claimed (RDP) | one-run bound | correct / guesses | GDP fit bound "
                  "| canaries | run seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for r in a["one_run"]:
            gdp = "n/a" if r["gdp_epsilon_lower_bound"] is None else _f(r["gdp_epsilon_lower_bound"])
            lines.append(f"| {r['mode']} | {r['observer']} | {_f(r['claimed_epsilon'])} | {_f(r['claimed_epsilon_rdp'])} | "
                         f"{_f(r['one_run_epsilon_lower_bound'])} (at most {_f(r['most_measurable'])}) | "
                         f"{r['correct']} / {r['guesses']} | {gdp} | {r['canaries']} | {r['run_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def run_audit(cfg: DictConfig) -> dict:
    """Both audits; write ``audit.md`` and ``audit.json`` under ``cfg.out_dir``. Returns the summary
    (``rows``: the per-mechanism audit; ``one_run``: the one-run audit's rows, one per mode and observer)."""
    a = cfg.audit
    check_audit_config(a)
    trials, delta, alpha = int(a.trials), float(a.delta), float(a.alpha)
    np.random.seed(int(a.seed))  # Flower's mechanisms draw their noise from numpy's global generator
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round of every run at INFO
    out = Path(cfg.out_dir)
    results = []
    for i, mech in enumerate(audit_mechanisms(a)):
        r = audit_mechanism(mech, trials, delta, int(a.seed) + i, alpha)
        results.append(r)
        gdp = r["gdp_epsilon_lower_bound"]
        print(f"[audit] {r['mechanism']}, {r['observer']}: epsilon >= {r['epsilon_lower_bound']:.2f} (Clopper-Pearson), "
              f">= {_f(gdp)} (GDP fit); claimed {_f(r['claimed_epsilon'])} (exact), {_f(r['claimed_epsilon_rdp'])} (RDP); "
              f"{trials} runs a side, {r['seconds']:.1f} s", flush=True)
    summary = {"trials": trials, "delta": delta, "clip": float(a.clip), "epsilon": float(a.epsilon),
               "noise_multiplier": float(a.noise_multiplier), "clients": int(a.clients), "alpha": alpha, "rows": results,
               "one_run": []}
    for mode in a.one_run.modes:
        for r in audit_one_run(str(mode), a, out):
            summary["one_run"].append(r)
            print(f"[audit] one run, {mode}, {r['observer']}: epsilon >= {_f(r['one_run_epsilon_lower_bound'])} (one run, "
                  f"{r['correct']}/{r['guesses']} right), >= {_f(r['gdp_epsilon_lower_bound'])} (GDP fit); claimed "
                  f"{_f(r['claimed_epsilon'])} (exact); {r['canaries']} canaries, run {r['run_seconds']:.1f} s", flush=True)
    atomic_write_json(out / "audit.json", summary)
    atomic_write_text(out / "audit.md", report(summary))
    print(f"[audit] {out / 'audit.md'}", flush=True)
    return summary


@console
def main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-audit key=value ...`` (conf/audit.yaml)."""
    run_audit(load_config(list(sys.argv[1:] if argv is None else argv), "audit"))


if __name__ == "__main__":
    main()
