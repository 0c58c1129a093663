"""One-command attribute inference experiment (the paper's Section 4-5).

``fed-ser-experiment private=iemocap features=emobase fl=fedsgd`` runs, for each configured
fold: private FL training on the private corpus (recorded), shadow FL training on the other
corpora with 80% of their data (recorded), attack training on the shadow updates labelled with
the shadow clients' gender, and evaluation on the private updates: fused ASR, per-layer ASR and
ASR with several rounds pooled. ``-m`` sweeps comma-separated overrides (the paper's grid).

Results: ``<out_dir>/results.json``, ``results.csv``, ``report.md`` and ``asr.png``; a multirun
also writes ``<grid_dir>/grid.csv`` and ``grid_report.md`` over every finished cell there.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from attacks.data import UpdateDataset, labelled_updates
from attacks.evaluate import attack_success_rate
from attacks.profile import profile_asr, train_profile_attack, update_profiles
from attacks.train import AttackConfig, predict, train_attack
from fed_ser.cli import expand_overrides, load_config, run_fl, run_vectorized_fl
from fed_ser.data.federated import FederatedData
from fed_ser.data.synthetic import CORPORA
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.pipeline import prepare
from fed_ser.report import write_defense_report, write_grid_report, write_run_report
from fed_ser.store import UpdateStore


def _attack_config(cfg: DictConfig) -> AttackConfig:
    a = cfg.attack
    return AttackConfig(layers=list(a.layers), lr=float(a.lr), weight_decay=float(a.weight_decay),
                        batch_size=int(a.batch_size), max_epochs=int(a.max_epochs), patience=int(a.patience),
                        val_share=float(a.val_share), channels=tuple(a.channels), kernel=int(a.kernel),
                        pools=tuple(a.pools), first_stride=int(a.first_stride), dropout=float(a.dropout), max_updates=int(a.max_updates), seed=int(a.seed))


def _fl_done(out: Path, rounds: int) -> dict | None:
    path = out / "results.json"
    if path.exists():
        res = json.loads(path.read_text())
        if res.get("final", {}).get("round") == rounds:
            return res
    return None


def _train_recorded(cfg: DictConfig, prepared: Path, out: Path, engine: str = "flower") -> dict:
    """Run (or reuse a finished) recorded FL run on Flower or on the vectorised engine."""
    if engine not in ("flower", "vectorised"):
        raise ValueError(f"shadow_engine: {engine!r} is not 'flower' or 'vectorised'")
    run = run_fl if engine == "flower" else run_vectorized_fl
    return _fl_done(out, int(cfg.fl.rounds)) or run(cfg, prepared, str(out), str(out / "updates"))


def _profile_attack(cfg: DictConfig, shadow_store: UpdateStore, s_updates: list, s_labels: np.ndarray,
                    priv_store: UpdateStore, p_updates: list, p_labels: np.ndarray) -> dict | None:
    """The input-profile attack (``attack.profile``) on the same shadow and private updates."""
    pc = cfg.attack.profile
    if not pc.enabled:
        return None
    layer = str(pc.layer)
    attack = train_profile_attack(update_profiles(shadow_store, s_updates, layer), s_labels, layer, float(pc.l2))
    profiles = update_profiles(priv_store, p_updates, layer)
    clients = np.array([u.partition for u in p_updates])
    trials, seed = int(cfg.attack.trials), int(cfg.attack.seed)
    pooled = {str(k): profile_asr(attack, profiles, clients, p_labels, trials, int(k), seed)
              for k in sorted({1, *map(int, cfg.attack.pool_rounds)})}
    return {"layer": layer, "asr": pooled["1"], "asr_pooled": pooled}


def run_fold(cfg: DictConfig, fold: int, out: Path) -> dict:
    """Private training, shadow training, attack training and evaluation for one fold."""
    private = str(cfg.private)
    if private not in CORPORA:
        raise ValueError(f"private: unknown corpus {private!r}; expected one of {CORPORA}")
    shadow = sorted(cfg.shadow) if cfg.shadow else [c for c in CORPORA if c != private]
    if private in shadow:
        raise ValueError(f"shadow: {shadow} must not contain the private corpus {private!r}")
    t0 = time.perf_counter()
    priv_data_path = prepare(cfg, [private], fold)
    priv_fl = _train_recorded(cfg, priv_data_path, out / f"fold{fold}" / "private")
    shadow_data_path = prepare(cfg, shadow, fold, train_share=float(cfg.shadow_share), tag="shadow-" + "+".join(shadow))
    shadow_fl = _train_recorded(cfg, shadow_data_path, out / f"fold{fold}" / "shadow", str(cfg.shadow_engine))
    t_fl = time.perf_counter() - t0

    acfg = _attack_config(cfg)
    shadow_store = UpdateStore(out / f"fold{fold}" / "shadow" / "updates")
    shadow_data = FederatedData.load(shadow_data_path)
    s_updates, s_labels = labelled_updates(shadow_store, shadow_data.client_gender)
    if cfg.attack.control:  # shuffled client genders: nothing left to learn but chance
        parts = np.unique([u.partition for u in s_updates])
        rng = np.random.default_rng(int(cfg.attack.seed) + 99)
        fake = dict(zip(parts.tolist(), rng.permutation(shadow_data.client_gender[parts])))
        s_labels = np.array([1 if fake[u.partition] == "F" else 0 for u in s_updates])
    print(f"[attack] training on {len(s_updates)} shadow updates ({', '.join(shadow)}), "
          f"layers {acfg.layers}", flush=True)
    trained = train_attack(shadow_store, s_updates, s_labels, acfg)

    priv_store = UpdateStore(out / f"fold{fold}" / "private" / "updates")
    priv_data = FederatedData.load(priv_data_path)
    p_updates, p_labels = labelled_updates(priv_store, priv_data.client_gender)
    ds = UpdateDataset(priv_store, p_updates, p_labels, acfg.layers, trained.stats)
    fused, per_layer = predict(trained.model, ds)
    clients = np.array([u.partition for u in p_updates])
    trials, seed = int(cfg.attack.trials), int(cfg.attack.seed)
    result = {
        "fold": fold, "private": private, "shadow": shadow, "algorithm": cfg.fl.algorithm,
        "features": cfg.features.name, "control": bool(cfg.attack.control),
        "ser": {"test_acc": priv_fl["selected"]["test_acc"], "test_uar": priv_fl["selected"]["test_uar"],
                "final_test_uar": priv_fl["final"]["test_uar"]},
        "shadow_ser_uar": shadow_fl["final"]["test_uar"],
        "private_clients": int(len(np.unique(clients))), "private_updates": len(p_updates),
        "shadow_updates": len(s_updates),
        "asr": attack_success_rate(fused, clients, p_labels, trials, 1, seed),
        "asr_per_layer": {l: attack_success_rate(per_layer[l], clients, p_labels, trials, 1, seed) for l in acfg.layers},
        "asr_pooled": {str(k): attack_success_rate(fused, clients, p_labels, trials, int(k), seed)
                       for k in cfg.attack.pool_rounds},
        "fusion_weights": dict(zip(acfg.layers, trained.model.fusion_weights.tolist())),
        "defence": {"dp_mode": str(cfg.dp.mode), "dp_epsilon": float(cfg.dp.epsilon), "dp_clip": float(cfg.dp.clip),
                    "dp_calibrate": str(cfg.dp.calibrate), "dropout": float(cfg.model.dropout),
                    "spent_epsilon_max": (priv_fl.get("privacy") or {}).get("spent_epsilon_max")},
        "profile": _profile_attack(cfg, shadow_store, s_updates, s_labels, priv_store, p_updates, p_labels),
        "attack_history": trained.history,
        "seconds": {"fl": t_fl, "total": time.perf_counter() - t0},
    }
    print(f"[attack] fold {fold}: ASR {result['asr']:.3f} per layer "
          + " ".join(f"{l} {v:.3f}" for l, v in result["asr_per_layer"].items())
          + " pooled " + " ".join(f"k={k}: {v:.3f}" for k, v in result["asr_pooled"].items()), flush=True)
    if result["profile"]:
        print(f"[attack] fold {fold}: input-profile attack ({result['profile']['layer']}) "
              + " ".join(f"k={k}: {v:.3f}" for k, v in result["profile"]["asr_pooled"].items()), flush=True)
    return result


def run_experiment(cfg: DictConfig) -> dict:
    """All configured folds of one (private corpus, features, algorithm) cell, with its report."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-control" if cfg.attack.control else ""  # the control shares the FL runs, not the report
    atomic_write_text(out / f"config{suffix}.yaml", OmegaConf.to_yaml(cfg))
    t0 = time.perf_counter()
    folds = []
    for fold in cfg.folds:
        folds.append(run_fold(cfg, int(fold), out))
        atomic_write_json(out / f"results{suffix}.json", {"folds": folds})  # partial results survive a crash
    summary = {
        "private": cfg.private, "algorithm": cfg.fl.algorithm, "features": cfg.features.name,
        "control": bool(cfg.attack.control), "folds": folds, "wall_seconds": time.perf_counter() - t0,
        "defence": folds[0]["defence"],
        "mean": {
            "asr": float(np.mean([f["asr"] for f in folds])),
            "ser_uar": float(np.mean([f["ser"]["test_uar"] for f in folds])),
            "ser_acc": float(np.mean([f["ser"]["test_acc"] for f in folds])),
            "asr_per_layer": {l: float(np.mean([f["asr_per_layer"][l] for f in folds])) for l in folds[0]["asr_per_layer"]},
            "asr_pooled": {k: float(np.mean([f["asr_pooled"][k] for f in folds])) for k in folds[0]["asr_pooled"]},
            "profile_asr_pooled": ({k: float(np.mean([f["profile"]["asr_pooled"][k] for f in folds]))
                                    for k in folds[0]["profile"]["asr_pooled"]} if folds[0].get("profile") else None),
        },
    }
    atomic_write_json(out / f"results{suffix}.json", summary)
    write_run_report(out, summary, suffix)
    print(f"[fed-ser] report: {out / f'report{suffix}.md'}  figure: {out / f'asr{suffix}.png'}  "
          f"data: {out / f'results{suffix}.csv'}", flush=True)
    return summary


def collect_summaries(grid_dir: Path) -> list[dict]:
    """The finished cell summaries (``*/results.json`` with a mean) under ``grid_dir``, by folder name.

    Cells written before ``defence`` carried the DP clip get it from the cell's own
    ``config.yaml``, so old and new cells share one table.
    """
    found = []
    for path in sorted(Path(grid_dir).glob("*/results.json")):
        summary = json.loads(path.read_text())
        if "mean" in summary and "defence" in summary:
            config = path.with_name("config.yaml")
            if "dp_clip" not in summary["defence"] and config.exists():
                summary["defence"]["dp_clip"] = float((OmegaConf.load(config).get("dp") or {}).get("clip", "nan"))
            found.append(summary)
    return found


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
