"""One-command attribute inference experiment (the paper's Section 4-5), under a chosen threat model.

``fed-ser-experiment private=iemocap features=emobase fl=fedsgd`` runs, for each configured fold:
private FL training on the private corpus (recorded), shadow FL training on the attacker's data
(recorded; :mod:`fed_ser.experiments.threat_model` says whose data that is), the inversion of every
recorded update (:mod:`fed_ser.experiments.recovery`), then every registered attack
(:mod:`attacks.inference.registry`) fitted on the attacker's data and scored on what the server saw,
and only then evaluated against the truth (:mod:`fed_ser.experiments.evaluation`), with its
control and permutation p-value (``attack.with_control``).

Every attack is reported with its ASR (the paper's metric) and balanced accuracy, each with a 95%
interval over speakers, the majority baseline of the attacked population, ROC AUC and TPR at low
FPR over one score per client, per fold and pooled over the folds. ``-m`` sweeps comma-separated
overrides.

Results: ``<out_dir>/results.json`` (schema: docs/results_schema.md), ``results.csv``,
``report.md``, ``asr.png`` and ``roc.png``; a multirun also writes ``<grid_dir>/grid.csv``,
``grid_report.md`` and ``grid_asr.png`` over every finished cell there.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from attacks.inference.base import ServerView
from fed_ser.core.statistics import uar_interval
from fed_ser.data.federated import FederatedData
from fed_ser.experiments.cli import console, expand_overrides, load_config, seconds_per_round
from fed_ser.experiments.defence_report import write_defense_report
from fed_ser.experiments.evaluation import (
    FOLD_KEY,
    AttackStage,
    FoldAttacks,
    attacker_data,
    pooled_summary,
    population,
)
from fed_ser.experiments.recovery import check_inversion_settings, invert_aggregates, local_settings, recover_batches, recovery_report
from fed_ser.experiments.report import write_grid_report, write_run_report
from fed_ser.experiments.signal import client_signal, signal_probes
from fed_ser.experiments.threat_model import ThreatModel, check_threat_model, shadow_fold, threat_model, train_recorded
from fed_ser.experiments.threshold_study import threshold_study
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.recording.store import UpdateStore
from fed_ser.run.settings import ConfigError

SCHEMA = 2  # results.json's layout (docs/results_schema.md)
#: Under SecAgg+: the server's differencing attack on the sums it unmasks (its feature-space attack).
SERVER_SUMS = "server-sum-differencing"


def check_settings(cfg: DictConfig) -> None:
    """Stop on a wrong threat-model, inversion or control setting before anything is prepared or written."""
    check_threat_model(cfg)
    check_inversion_settings(cfg)
    AttackStage(cfg)  # attack.control_permutations, attack.cnn_control_permutations
    if bool(cfg.fl.secagg) and not (cfg.attack.feature_space.enabled and cfg.attack.aggregate_observer):
        raise ConfigError("fl.secagg=true leaves the server the round sums only: the attack needs "
                          "attack.feature_space.enabled=true and attack.aggregate_observer=true")


def train_federations(cfg: DictConfig, fold: int, out: Path) -> tuple[ThreatModel, dict, dict | None]:
    """The fold's recorded private run and, unless SecAgg+ leaves no update to learn from, the shadow run."""
    tm = threat_model(cfg, fold)
    priv_fl = train_recorded(cfg, tm.private_data, out / f"fold{fold}", "private", str(cfg.private_engine))
    if bool(cfg.fl.secagg):
        return tm, priv_fl, None
    shadow_cfg = cfg
    if str(cfg.shadow.engine) != "flower" and str(cfg.flower_dp.mode) != "none":
        # Flower's DP runs inside Flower only: the attacker's in-process shadow federations train without it
        # (the feature-space attack needs no shadow federation; the CNN and profile attacks are then the weaker)
        shadow_cfg = OmegaConf.merge(cfg, {"flower_dp": {"mode": "none"}})
    shadow_fl = train_recorded(shadow_cfg, tm.shadow_data, out / f"fold{shadow_fold(cfg, fold)}", "shadow",
                               str(cfg.shadow.engine))
    return tm, priv_fl, shadow_fl


def server_view(cfg: DictConfig, fold: int, priv_fl: dict, priv_data: FederatedData) -> tuple[ServerView, dict | None, dict | None]:
    """What the server saw in the private run, with the inversion of every update and round sum done;
    and, checked against the truth, how much the inversion recovered (reports only)."""
    store = UpdateStore(Path(priv_fl["dir"]) / "updates")
    updates, seed = store.updates(), int(cfg.attack.seed)
    view = ServerView(store, updates, local_settings(cfg))
    inversion = aggregate = None
    if cfg.attack.feature_space.enabled and updates:
        t0 = time.perf_counter()
        print(f"[attack] fold {fold}: inverting {len(updates)} private updates", flush=True)
        view.recovered = recover_batches(cfg, store, updates, seed)
        inversion = {**recovery_report(view.recovered, updates, priv_data), "seconds": time.perf_counter() - t0}
        print(f"[attack] fold {fold}: recovered {inversion['recovered']} of {inversion['utterances_in_batches']} "
              f"utterances ({inversion['complete_updates']} of {inversion['updates']} batches whole, "
              f"{inversion['share_exact']:.1%} exact, {inversion['recovered_within_10pct']} within 10%) "
              f"in {inversion['seconds']:.0f} s", flush=True)
    if cfg.attack.feature_space.enabled and cfg.attack.aggregate_observer:
        secagg = bool(cfg.fl.secagg)
        members = {r["round"]: tuple(r.get("clients", ())) for r in priv_fl["rounds"]} if secagg else None
        view.aggregates["aggregate-observer"], aggregate = invert_aggregates(cfg, store, priv_data, seed, members)
        print(f"[attack] fold {fold}: observer of aggregates: recovered {aggregate['recovered']} of "
              f"{aggregate['utterances_in_rounds']} utterances from {aggregate['rounds']} round sums "
              f"in {aggregate['seconds']:.0f} s", flush=True)
        if secagg:  # the server's own view: the sums it unmasks, before any noise it adds (none: the same sums)
            view.aggregates[SERVER_SUMS] = view.aggregates["aggregate-observer"]
            if str(cfg.flower_dp.mode) == "client-fixed":  # the only mode that adds noise after unmasking
                view.aggregates[SERVER_SUMS], aggregate["server"] = invert_aggregates(cfg, store, priv_data, seed, members,
                                                                                      server_view=True)
    return view, inversion, aggregate


def attack_fold(cfg: DictConfig, fold: int, tm: ThreatModel, priv_fl: dict, shadow_fl: dict | None,
                stage: AttackStage) -> FoldAttacks:
    """The attacks on one fold's recorded private run. The private data set is read for the truth only
    (populations, the inversion's and the probes' reports): no attack's score depends on it."""
    priv_data, shadow_data = FederatedData.load(tm.private_data), FederatedData.load(tm.shadow_data)
    view, inversion, aggregate = server_view(cfg, fold, priv_fl, priv_data)
    shadow_store = UpdateStore(Path(shadow_fl["dir"]) / "updates") if shadow_fl is not None else None
    attacker = attacker_data(shadow_data, shadow_store, shadow_store.updates() if shadow_store is not None else [])
    attacked = {u.client for u in view.updates} | {c for agg in view.aggregates.values() for a, _ in agg for c in a.clients}
    truth = population(priv_data, attacked, fold)
    attacks = stage.run(attacker, view, truth, fold, control=bool(cfg.attack.with_control))
    attacks.inversion, attacks.aggregate = inversion, aggregate
    if view.recovered is not None:
        attacks.signal = client_signal(priv_data, view.updates, view.recovered, fold)
    return attacks


def ser_summary(results: list[dict]) -> dict:
    """SER of the selected models over the held-out speakers of ``results`` (private runs), with the
    UAR's interval over those speakers and whether it is above chance (1 / 4 emotions)."""
    acc = float(np.mean([r["selected"]["test_acc"] for r in results]))
    counts = [np.asarray(r["selected"].get("test_counts") or [], dtype=np.float64) for r in results]
    counts = [c for c in counts if c.ndim == 3 and len(c)]
    uar = uar_interval(np.concatenate(counts)) if len(counts) == len(results) else None
    point = float(np.mean([r["selected"]["test_uar"] for r in results]))
    return {"uar": point, "acc": acc, "uar_pooled": None if uar is None else uar.point,
            "uar_ci": None if uar is None else uar.as_list(), "test_speakers": int(sum(len(c) for c in counts)),
            "chance": 0.25, "above_chance": None if uar is None else bool(uar.low > 0.25)}


def fold_result(cfg: DictConfig, fold: int, tm: ThreatModel, priv_fl: dict, shadow_fl: dict | None, attacks: FoldAttacks,
                seconds: dict) -> dict:
    """One fold's results.json entry."""
    return {
        "fold": fold, "private": tm.private, "shadow": list(tm.shadow), "shadow_mode": tm.mode,
        "shadow_fold": shadow_fold(cfg, fold), "threat_model": tm.describe(), "algorithm": cfg.fl.algorithm,
        "features": cfg.features.name,
        "ser": {"test_acc": priv_fl["selected"]["test_acc"], "test_uar": priv_fl["selected"]["test_uar"],
                "final_test_uar": priv_fl["final"]["test_uar"], **ser_summary([priv_fl])},
        "shadow_ser_uar": shadow_fl["final"]["test_uar"] if shadow_fl else None, "secagg": bool(cfg.fl.secagg),
        "private_clients": len({c for e in attacks.evaluations.values() for c in e.client_score}),
        "private_updates": attacks.updates, "shadow_updates": attacks.shadow_updates,
        "attacks": pooled_summary([attacks], seed=int(cfg.attack.seed)),
        "attack_labels": attacks.labels, "attack_fits": attacks.described,
        "defence": defence_summary(cfg, priv_fl),
        "seconds_per_round": seconds_per_round(priv_fl),
        "inversion": attacks.inversion, "aggregate": attacks.aggregate, "seconds": seconds,
    }


def defence_summary(cfg: DictConfig, priv_fl: dict) -> dict:
    """The defence a run trained under, and what its DP spent."""
    return {"dp_mode": str(cfg.dp.mode), "dp_epsilon": float(cfg.dp.epsilon), "dp_clip": float(cfg.dp.clip),
            "dp_calibrate": str(cfg.dp.calibrate), "dropout": float(cfg.model.dropout),
            "spent_epsilon_max": (priv_fl.get("privacy") or {}).get("spent_epsilon_max"),
            "flower_dp_mode": str(cfg.flower_dp.mode), "flower_dp_noise": float(cfg.flower_dp.noise_multiplier),
            "flower_dp_clip": float(cfg.flower_dp.clip), "flower_dp_epsilon": float(cfg.flower_dp.epsilon),
            "privacy": {k: v for k, v in (priv_fl.get("privacy") or {}).items() if k != "clients"}}


def _print_attacks(prefix: str, attacks: dict) -> None:
    for name, m in attacks.items():
        if "@" in name:
            continue
        bal = "n/a" if m["balanced"] is None else f"{m['balanced']:.3f} [{_fmt(m['balanced_ci'][0])}, {_fmt(m['balanced_ci'][1])}]"
        line = (f"[attack] {prefix}{name}: ASR {m['asr']:.3f} [{m['asr_ci'][0]:.3f}, {m['asr_ci'][1]:.3f}], balanced {bal}, "
                f"majority {m['majority']:.3f}, AUC {_fmt(m['auc'])} over {m['clients']} clients of {m['speakers']} speakers")
        if "control" in m:
            c = m["control"]
            line += (f"; control balanced {_fmt(c['balanced'])}, p = {_fmt(m['p_value'])} ({m['permutations']} relabellings)"
                     + (" CONTROL ABOVE CHANCE" if c["above_chance"] else ""))
        print(line, flush=True)


def run_fold(cfg: DictConfig, fold: int, out: Path, stage: AttackStage) -> tuple[dict, FoldAttacks]:
    """Private training, shadow training, inversion, attacks and their evaluation for one fold."""
    t0 = time.perf_counter()
    tm, priv_fl, shadow_fl = train_federations(cfg, fold, out)
    t_fl = time.perf_counter() - t0
    attacks = attack_fold(cfg, fold, tm, priv_fl, shadow_fl, stage)
    result = fold_result(cfg, fold, tm, priv_fl, shadow_fl, attacks, {"fl": t_fl, "total": time.perf_counter() - t0})
    result["private_run"] = priv_fl
    _print_attacks(f"fold {fold}: ", result["attacks"])
    return result, attacks


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def run_experiment(cfg: DictConfig) -> dict:
    """All configured folds of one cell, with its report; metrics pooled over the folds' clients."""
    check_settings(cfg)  # a wrong value stops before the cell's folder exists
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    t0 = time.perf_counter()
    stage = AttackStage(cfg)
    folds, fold_attacks, private_runs = [], [], []
    for fold in cfg.folds:
        result, attacks = run_fold(cfg, int(fold), out, stage)
        private_runs.append(result.pop("private_run"))
        folds.append(result)
        fold_attacks.append(attacks)
        atomic_write_json(out / "results.json", {"schema": SCHEMA, "folds": folds})  # partial results survive a crash
    first = folds[0]
    labels = {k: v for f in fold_attacks for k, v in f.labels.items()}
    summary = {
        "schema": SCHEMA, "private": str(cfg.private), "private_corpus": first["private"], "shadow": first["shadow"],
        "shadow_mode": first["shadow_mode"], "threat_model": first["threat_model"], "algorithm": cfg.fl.algorithm,
        "features": cfg.features.name, "synthetic": synthetic_cell(first), "folds": folds,
        "wall_seconds": time.perf_counter() - t0, "defence": first["defence"], "ser": ser_summary(private_runs),
        "attacks": pooled_summary(fold_attacks, seed=int(cfg.attack.seed)),
        "attack_labels": labels,
    }
    signals = [f.signal for f in fold_attacks if f.signal is not None]
    if signals:
        summary["signal"] = signal_probes(signals, int(cfg.attack.seed))
        sig = summary["signal"]
        print(f"[attack] signal, probe cross-validated over the {sig['clients']} attacked clients (balanced accuracy): "
              f"true statistics {sig['probe_true']:.3f}, recovered {sig['probe_recovered']:.3f}, "
              f"relabelled speakers {sig['probe_true_shuffled']:.3f}", flush=True)
    with_fs = [(f, i) for i, f in zip(cfg.folds, fold_attacks) if "feature-space" in f.scores]
    if with_fs and len(with_fs) == len(fold_attacks):
        summary["threshold_study"] = threshold_study([f.scores["feature-space"] for f, _ in with_fs],
                                                     [f.evaluations["feature-space"].female for f, _ in with_fs],
                                                     [int(i) * FOLD_KEY for _, i in with_fs], int(cfg.attack.trials),
                                                     seed=int(cfg.attack.seed))
    _print_attacks("pooled: ", summary["attacks"])
    atomic_write_json(out / "results.json", summary)
    write_run_report(out, summary)
    print(f"[fed-ser] report: {out / 'report.md'}  figures: {out / 'asr.png'}, {out / 'roc.png'}  "
          f"data: {out / 'results.csv'}", flush=True)
    return summary


def synthetic_cell(fold: dict) -> bool:
    """Whether any corpus of the cell is synthetic (its figures then check the pipeline, see the report)."""
    return "(synthetic)" in fold["private"] or any("(synthetic)" in s for s in fold["shadow"])


def collect_summaries(grid_dir: Path) -> list[dict]:
    """The finished cell summaries (``*/results.json`` with pooled attack metrics) under ``grid_dir``."""
    found = []
    for path in sorted(Path(grid_dir).glob("*/results.json")):
        summary = json.loads(path.read_text())
        if summary.get("schema") != SCHEMA:
            print(f"[fed-ser] {path}: written by an older fed-ser (results schema {summary.get('schema', 1)}, "
                  f"not {SCHEMA}); left out of the grid: run that cell again", file=sys.stderr)
        elif "attacks" in summary and "ser" in summary:
            found.append(summary)
    return found


@console
def main(argv: list[str] | None = None, config_name: str = "experiment") -> None:
    """Console script ``fed-ser-experiment [-m] key=value ...``."""
    multirun, runs = expand_overrides(list(sys.argv[1:] if argv is None else argv))
    summaries = []
    for i, overrides in enumerate(runs, 1):
        if multirun:
            print(f"[fed-ser] multirun {i}/{len(runs)}: {' '.join(overrides)}", flush=True)
        cfg = load_config(overrides, config_name)
        summaries.append(run_experiment(cfg))
    grid_dir = Path(load_config(runs[0], config_name).grid_dir)
    if config_name == "defense":  # every finished cell under grid_dir, so separate sweeps add up
        write_defense_report(grid_dir, collect_summaries(grid_dir) or summaries)
        print(f"[fed-ser] defence report: {grid_dir / 'defense_report.md'}")
    elif multirun:  # every finished cell under grid_dir too, so cells run one at a time add up
        write_grid_report(grid_dir, collect_summaries(grid_dir) or summaries)
        print(f"[fed-ser] grid report: {grid_dir / 'grid_report.md'}")


def defense_main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-defense -m dp=sample dp.epsilon=1,5,10,...`` (conf/defense.yaml)."""
    main(argv, "defense")


if __name__ == "__main__":
    main()
