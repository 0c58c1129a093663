"""The threat-model matrix in one command: defences x observers, on one private corpus.

``fed-ser-threats private=emodb data.roots.emodb=PATH shadow.mode=speakers`` runs one attack
experiment (:func:`fed_ser.experiments.attack.run_experiment`) per row of ``threats.rows`` (a name
and the overrides that turn its defence on: Flower's own DP wrappers and mods, fed-ser's DP) and
reads each cell twice: as the server that receives every update (the paper's attacker) and as an
observer of the round sums only (what SecAgg+ leaves the server, and what the global models show
anyone; :mod:`attacks.inference.aggregate`). Each cell also says what its epsilon guarantees
against each observer. Results: ``<out_dir>/matrix.md``, ``matrix.csv``, ``matrix.json`` and
``asr_vs_epsilon.png``; each row's experiment under ``<out_dir>/<row>/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fed_ser.experiments.attack import run_experiment
from fed_ser.experiments.config import console, load_config
from fed_ser.experiments.defence_report import write_threat_report
from fed_ser.io import atomic_write_json
from fed_ser.run.settings import ConfigError


def observer_epsilons(summary: dict) -> tuple[float | None, float | None, str]:
    """Epsilon against the server and against an observer of the aggregates (None: no guarantee), and what it means."""
    d = summary["defence"]
    p = d.get("privacy") or {}
    if not p:
        return None, None, ""
    if str(p.get("mode", "")).startswith("flower:"):
        return p["epsilon_server"], p["epsilon_aggregate_observer"], p["guarantee"]
    eps = p["spent_epsilon_max"]
    if p["mode"] == "udp":  # as published: not a guarantee against anyone
        return None, None, p["guarantee"]
    # DP-FedSGD and user-level DP hold against the server; an observer of the sums sees less (post-processing)
    return eps, min(eps, p.get("aggregate_observer_epsilon", eps)), p["guarantee"]


def run_matrix(cfg: DictConfig, overrides: list[str]) -> dict:
    """Every row of ``cfg.threats.rows`` as one experiment cell under ``cfg.out_dir``; the matrix report."""
    rows = OmegaConf.to_container(cfg.threats.rows)
    if not isinstance(rows, dict) or not rows:
        raise ConfigError("threats.rows: expected a mapping of row name -> list of overrides")
    only = [str(r) for r in cfg.threats.only]
    unknown = sorted(set(only) - set(rows))
    if unknown:
        raise ConfigError(f"threats.only: no row(s) {unknown} (rows: {', '.join(rows)})")
    rows = {k: v for k, v in rows.items() if not only or k in only}
    out = Path(cfg.out_dir)
    cells = _earlier_rows(out, cfg, rows)
    for i, (name, row) in enumerate(rows.items(), 1):
        if not isinstance(row, list):
            raise ConfigError(f"threats.rows.{name}: expected a list of overrides, got {row!r}")
        print(f"[threats] row {i}/{len(rows)}: {name} ({' '.join(row) or 'no defence'})", flush=True)
        cell_cfg = load_config([*overrides, *map(str, row), f"out_dir={out / name}"], "threats")
        summary = run_experiment(cell_cfg)
        eps_server, eps_agg, guarantee = observer_epsilons(summary)
        fold_seconds = [f.get("seconds_per_round") for f in summary["folds"] if f.get("seconds_per_round")]
        cells[name] = {**summary, "epsilon_server": eps_server, "epsilon_aggregate": eps_agg, "guarantee": guarantee,
                       "seconds_per_round": sum(fold_seconds) / len(fold_seconds) if fold_seconds else None,
                       "overrides": [str(o) for o in row], "rounds": int(cfg.fl.rounds), "folds": summary["folds"]}
        atomic_write_json(out / "matrix.json", {"rows": {k: _compact(v) for k, v in cells.items()}})
        write_threat_report(out, cells, f"{summary['private_corpus']}, {cfg.fl.algorithm}, {summary['threat_model']}")
    print(f"[threats] matrix: {out / 'matrix.md'}  figure: {out / 'asr_vs_epsilon.png'}", flush=True)
    return cells


def _earlier_rows(out: Path, cfg: DictConfig, running: dict) -> dict:
    """Rows an earlier run of this matrix finished with the same rounds and folds, and that this run does not
    redo: kept, so that rows run one at a time (``threats.only``) add up in one matrix."""
    path = out / "matrix.json"
    if not path.exists():
        return {}
    kept = {}
    for name, row in json.loads(path.read_text()).get("rows", {}).items():
        if name not in running and row.get("rounds") == int(cfg.fl.rounds) and row.get("fold_ids") == [int(f) for f in cfg.folds]:
            kept[name] = {**row, "folds": [{} for _ in row["fold_ids"]]}
    if kept:
        print(f"[threats] kept rows of an earlier run in {path}: {', '.join(kept)}", flush=True)
    return kept


def _compact(summary: dict) -> dict:
    keep = ("private_corpus", "threat_model", "algorithm", "ser", "attacks", "defence", "epsilon_server",
            "epsilon_aggregate", "guarantee", "seconds_per_round", "wall_seconds", "overrides", "rounds")
    out = {k: summary.get(k) for k in keep}
    out["attacks"] = {n: {k: v for k, v in m.items() if k != "roc"} for n, m in summary["attacks"].items()}
    out["fold_ids"] = [f["fold"] for f in summary["folds"] if "fold" in f] or summary.get("fold_ids", [])  # kept rows
    out["aggregate"] = summary.get("aggregate") or [f.get("aggregate") for f in summary["folds"]]
    return out


@console
def main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-threats key=value ...`` (conf/threats.yaml)."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    run_matrix(load_config(overrides, "threats"), overrides)


if __name__ == "__main__":
    main()
