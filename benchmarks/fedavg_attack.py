"""Where the FedAvg attacks work and where they stop (issue 35): a table and a figure over experiment cells.

Each cell is a ``fed-ser-experiment fl=fedavg`` run (its ``results.json`` and ``config.yaml``) with one
setting of the local training: optimiser, local epochs, client size (``shards.emodb``: shards a speaker,
so fewer shards mean more rows a client and more local steps). The attacks, their speaker-level intervals,
permutation controls and the inversion's recovery are the experiment's own (``fed_ser.experiments``);
this script only lays them side by side, with the attacks' cost per attacked update on the machine that
ran the cells. The cells of 2026-12-07 (docs/results.md) were run as::

    fed-ser-experiment private=emodb data.roots.emodb=../shared/data/emodb shadow.mode=speakers fl=fedavg \\
        fl.optimizer=adam fl.lr=0.0005 fl.local_epochs=2 shards.emodb=4 'folds=[0,1,2,3,4]' \\
        attack.cnn_control_permutations=0 out_dir=runs/experiment/table-emodb-fedavg-adam-e2-s4

    .venv/bin/python benchmarks/fedavg_attack.py --table runs/experiment/table-* runs/experiment/emodb-real-emobase-fedavg-*
    .venv/bin/python benchmarks/fedavg_attack.py --figure docs/fedavg_epochs.png benchmarks/results/fedavg_attack_2026-12-06.jsonl

``benchmarks/results/fedavg_attack_2026-12-06.jsonl`` holds the first measurements of the two attacks
(2026-12-06, commits fd79fd1-53e4aa3), made by this script's earlier version, which ran the attacks on
recorded cells itself (the same speaker bootstrap, relabelling controls and balanced accuracy, its own
copy of them; the inversion before 83adfa2's stricter grouping of rows; the feature-space classifier
there is called ``inversion``). Given as a file, its rows join the table and the figure, marked as such.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

ATTACKS = ("round-matched", "feature-space", "feature-space-adaptive", "cnn", "profile")


def read_cell(path: Path) -> dict | None:
    """One cell's settings and pooled results, or None when it has no finished ``results.json``."""
    res_path, cfg_path = path / "results.json", path / "config.yaml"
    if not res_path.exists() or not cfg_path.exists():
        return None
    res, cfg = json.loads(res_path.read_text()), yaml.safe_load(cfg_path.read_text())
    if "attacks" not in res:  # a run that stopped before its pooled summary
        return None
    fl = cfg["fl"]
    inv = [f["inversion"] for f in res["folds"] if f.get("inversion")]
    rows = sum(i["utterances_in_batches"] for i in inv) / max(sum(i["updates"] for i in inv), 1) if inv else float("nan")
    return {"cell": path.name, "shadow": res["shadow_mode"], "optimizer": fl["optimizer"], "lr": float(fl["lr"]),
            "epochs": int(fl["local_epochs"]), "shards": int(cfg["shards"].get(res["private"], 0)), "rows": rows,
            "steps": int(fl["local_epochs"]) * math.ceil(rows / int(fl["batch_size"])) if inv else None,
            "ser": res["ser"], "attacks": res["attacks"], "folds": res["folds"], "signal": res.get("signal", {}),
            "wall_seconds": res["wall_seconds"]}


def read_legacy(path: Path) -> list[dict]:
    """The 2026-12-06 measurements (JSON lines of this script's earlier version) as cells of :func:`read_cell`'s
    shape; the last line of a cell and attack wins (later runs repeated one attack of a cell)."""
    merged: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        run = json.loads(line)
        st = run["settings"]
        cell = merged.setdefault(run["cell"], {
            "cell": f"{run['cell']} (2026-12-06)", "shadow": "speakers", "optimizer": st["optimizer"], "lr": float(st["lr"]),
            "epochs": int(st["local_epochs"]), "shards": int(run["cell"].rsplit("-s", 1)[1]), "rows": float(st["client_size"]),
            "steps": int(round(st["steps"])), "ser": {"uar_pooled": st["ser_uar"], "uar_ci": [float("nan")] * 2},
            "attacks": {}, "folds": [], "legacy_seconds": {}, "legacy_recovery": "-"})
        for r in run["results"]:
            name = "feature-space" if r["attack"] == "inversion" else r["attack"]
            cell["attacks"][name] = {"balanced": r["balanced"], "balanced_ci": r["ci"], "auc": r["auc"], "speakers": r["speakers"],
                                     "clients": r["clients"], "control": {"balanced": r["control"]}, "p_value": r["p"],
                                     "permutations": r["control_runs"]}
            cell["legacy_seconds"][name] = r["seconds_per_update"]
            if "recovery" in r:
                rec = r["recovery"]
                cell["legacy_recovery"] = (f"{100 * rec['within_10pct'] / rec['utterances']:.0f}% / {100 * rec['within_25pct'] / rec['utterances']:.0f}% "
                                           f"/ {100 * rec['sign_95pct'] / rec['utterances']:.0f}% of {rec['utterances']}")
    return list(merged.values())


def seconds_per_update(cell: dict, attack: str) -> float | None:
    """What the attack cost per attacked update in this cell (its fit on the true labels and its scoring;
    the controls not counted): the simulations and the classifier for the round-matched attack, the
    inversion for the feature-space attacks."""
    if "legacy_seconds" in cell:
        return cell["legacy_seconds"].get(attack)
    updates = sum(int(f.get("private_updates", 0)) for f in cell["folds"])
    if not updates:
        return None
    if attack == "round-matched":
        hist = [f["attack_fits"].get("round-matched", {}).get("history", {}) for f in cell["folds"]]
        return sum(h.get("simulate_seconds", 0.0) + h.get("fit_seconds", 0.0) for h in hist) / updates
    if attack.startswith("feature-space"):
        return sum(float((f.get("inversion") or {}).get("seconds", 0.0)) for f in cell["folds"]) / updates
    return None


def recovery(cell: dict) -> str:
    """Utterances recovered within 10% / 25% relative error of a true one, and sign patterns >= 95% right."""
    if "legacy_recovery" in cell:
        return cell["legacy_recovery"]
    inv = [f["inversion"] for f in cell["folds"] if f.get("inversion")]
    total = sum(i["utterances_in_batches"] for i in inv)
    if not total or "recovered_within_10pct" not in inv[0]:
        return "-"
    pct = lambda k: f"{100 * sum(i[k] for i in inv) / total:.0f}%"
    return f"{pct('recovered_within_10pct')} / {pct('recovered_within_25pct')} / {pct('recovered_signs_95pct')} of {total}"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(cells: list[dict]) -> str:
    """The markdown table: one row per cell and attack."""
    head = ("| cell | shadow | optimiser, lr | local epochs | rows a client (steps) | SER UAR [95% CI] | attack "
            "| balanced [95% speaker CI] | AUC | speakers (clients) | control balanced, p (relabellings) | s / update "
            "| recovered within 10% / 25% / signs |\n" + "|---" * 13 + "|\n")
    lines = []
    for c in sorted(cells, key=lambda c: (c["shadow"], c["optimizer"], c["shards"], c["epochs"])):
        ser = c["ser"]
        for name in ATTACKS:
            m = c["attacks"].get(name)
            if m is None:
                continue
            ctl = m.get("control") or {}
            cost = seconds_per_update(c, name)
            lines.append(
                f"| {c['cell']} | {c['shadow']} | {c['optimizer']}, {c['lr']:g} | {c['epochs']} | {c['rows']:.1f} ({c['steps']}) "
                f"| {_pct(ser.get('uar_pooled'))} [{_pct(ser['uar_ci'][0])}, {_pct(ser['uar_ci'][1])}] | {name} "
                f"| {_pct(m['balanced'])} [{_pct(m['balanced_ci'][0])}, {_pct(m['balanced_ci'][1])}] | {_num(m.get('auc'), 2)} "
                f"| {m['speakers']} ({m['clients']}) | {_pct(ctl.get('balanced'))}, {_num(m.get('p_value'), 3)} "
                f"({m.get('permutations', 0)}) | {'-' if cost is None else f'{cost:.2f}'} "
                f"| {recovery(c) if name.startswith('feature-space') else '-'} |")
    return head + "\n".join(lines) + "\n"


def figure(cells: list[dict], path: Path, shards: int = 4) -> None:
    """Balanced accuracy (speaker-level 95% interval) against local epochs, per optimiser and attack, for the
    cells with ``shards`` shards a speaker and the attacker's own speakers as shadow data (where a setting was
    measured twice, the experiment's own cell over the 2026-12-06 line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [c for c in cells if c["shards"] == shards and c["shadow"] == "speakers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, opt in zip(axes, ("adam", "sgd")):
        for k, name in enumerate(("round-matched", "feature-space", "feature-space-adaptive")):
            best: dict[int, dict] = {}  # per local epochs, the experiment's own cell over a 2026-12-06 one
            for c in sorted(chosen, key=lambda c: "legacy_seconds" not in c):
                if c["optimizer"] == opt and name in c["attacks"]:
                    best[c["epochs"]] = c["attacks"][name]
            pts = sorted(best.items(), key=lambda kv: kv[0])
            if not pts:
                continue
            x = [e + 0.06 * (k - 1.5) for e, _ in pts]
            y = [100 * m["balanced"] for _, m in pts]
            err = [[100 * (m["balanced"] - m["balanced_ci"][0]) for _, m in pts], [100 * (m["balanced_ci"][1] - m["balanced"]) for _, m in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        old = sorted({c["epochs"] for c in chosen if c["optimizer"] == opt and "legacy_seconds" in c}
                     - {c["epochs"] for c in chosen if c["optimizer"] == opt and "legacy_seconds" not in c})
        note = f"\n(epochs {', '.join(map(str, old))}: the 2026-12-06 measurements)" if old else ""
        ax.set(title=f"EmoDB FedAvg, {opt} clients{note}", xlabel="local epochs", xticks=[1, 2, 5])
    axes[0].set_ylabel("balanced accuracy, % (95% speaker CI)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", nargs="+", type=Path, help="experiment cell folders (results.json, config.yaml), or the 2026-12-06 JSON lines")
    ap.add_argument("--table", action="store_true", help="print the markdown table")
    ap.add_argument("--figure", type=Path, help="write the balanced-accuracy-against-local-epochs figure here")
    args = ap.parse_args(argv)
    cells = []
    for path in args.cells:
        if path.suffix == ".jsonl":
            cells += read_legacy(path)
            continue
        cell = read_cell(path)
        if cell is None:
            print(f"[fedavg_attack] {path}: no finished results.json, skipped", file=sys.stderr)
        else:
            cells.append(cell)
    if args.table or not args.figure:
        print(table(cells))
    if args.figure:
        figure(cells, args.figure)
        print(f"[fedavg_attack] figure: {args.figure}")


if __name__ == "__main__":
    main()
