"""Readable results: CSV, Markdown tables shaped like the paper's, and a PNG figure."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fed_ser.io import atomic_write_bytes, atomic_write_text

# The paper's Table IV (ASR, Emo-Base) and Table III (SER UAR, Emo-Base), for comparison.
PAPER_ASR = {("iemocap", "fedsgd"): 0.8933, ("iemocap", "fedavg"): 0.8745, ("crema_d", "fedsgd"): 0.7387,
             ("crema_d", "fedavg"): 0.8198, ("msp_improv", "fedsgd"): 0.9136, ("msp_improv", "fedavg"): 0.8286}
PAPER_UAR = {("iemocap", "fedsgd"): 0.6162, ("iemocap", "fedavg"): 0.6125, ("crema_d", "fedsgd"): 0.6424,
             ("crema_d", "fedavg"): 0.6638, ("msp_improv", "fedsgd"): 0.4723, ("msp_improv", "fedavg"): 0.4767}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _fold_rows(summary: dict) -> list[dict]:
    rows = []
    for f in summary["folds"]:
        row = {"private": f["private"], "algorithm": f["algorithm"], "features": f["features"], "fold": f["fold"],
               "control": f["control"], "ser_acc": f["ser"]["test_acc"], "ser_uar": f["ser"]["test_uar"], "asr": f["asr"]}
        row.update({f"asr_{l}": v for l, v in f["asr_per_layer"].items()})
        row.update({f"asr_pool{k}": v for k, v in f["asr_pooled"].items()})
        rows.append(row)
    return rows


def _figure(path: Path, summaries: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels, groups = [], []
    for s in summaries:
        m = s["mean"]
        labels.append(f"{s['private']}\n{s['algorithm']}")
        groups.append([m["asr"]] + list(m["asr_per_layer"].values()) + [m["asr_pooled"][k] for k in m["asr_pooled"] if k != "1"])
    names = ["fused"] + list(summaries[0]["mean"]["asr_per_layer"]) + [f"pooled k={k}" for k in summaries[0]["mean"]["asr_pooled"] if k != "1"]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(groups))], [g[j] for g in groups], width, label=name)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("attack success rate")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.set_title("Gender inference from shared updates (dashed: chance)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _tables(summaries: list[dict]) -> str:
    lines = ["## SER performance (Table III shape): held-out speakers, model chosen by client validation UAR", "",
             "| private corpus | algorithm | Acc | UAR | paper UAR |", "|---|---|---|---|---|"]
    for s in summaries:
        m = s["mean"]
        lines.append(f"| {s['private']} | {s['algorithm']} | {_pct(m['ser_acc'])} | {_pct(m['ser_uar'])} | "
                     f"{_pct(PAPER_UAR.get((s['private'], s['algorithm'])))} |")
    lines += ["", "## Attack success rate (Table IV shape)", "",
              "| private corpus | algorithm | ASR | paper ASR | control (shuffled genders) |", "|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['private']} | {s['algorithm']} | {_pct(s['mean']['asr'])} | "
                     f"{_pct(PAPER_ASR.get((s['private'], s['algorithm'])))} | {'yes' if s['control'] else 'no'} |")
    layer_names = list(summaries[0]["mean"]["asr_per_layer"])
    lines += ["", "## Per-layer ASR without fusion (Table V shape)", "",
              "| private corpus | algorithm | " + " | ".join(layer_names) + " |", "|---|---|" + "---|" * len(layer_names)]
    for s in summaries:
        lines.append(f"| {s['private']} | {s['algorithm']} | " + " | ".join(_pct(v) for v in s["mean"]["asr_per_layer"].values()) + " |")
    ks = list(summaries[0]["mean"]["asr_pooled"])
    lines += ["", "## ASR with k rounds of a client's updates pooled", "",
              "| private corpus | algorithm | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for s in summaries:
        lines.append(f"| {s['private']} | {s['algorithm']} | " + " | ".join(_pct(s["mean"]["asr_pooled"][k]) for k in ks) + " |")
    return "\n".join(lines) + "\n"


def write_run_report(out: Path, summary: dict, suffix: str = "") -> None:
    """``results<suffix>.csv``, ``report<suffix>.md`` and ``asr<suffix>.png`` for one experiment cell."""
    atomic_write_text(out / f"results{suffix}.csv", _csv(_fold_rows(summary)))
    folds = ", ".join(str(f["fold"]) for f in summary["folds"])
    head = (f"# fed-ser attack report: private {summary['private']}, {summary['algorithm']}, {summary['features']}\n\n"
            f"Folds: {folds}. Shadow corpora: {', '.join(summary['folds'][0]['shadow'])}. "
            f"Wall time {summary['wall_seconds']:.0f} s.\n\n![ASR](asr{suffix}.png)\n\n")
    atomic_write_text(out / f"report{suffix}.md", head + _tables([summary]))
    _figure(out / f"asr{suffix}.png", [summary])


def write_grid_report(grid_dir: Path, summaries: list[dict]) -> None:
    """``grid.csv``, ``grid_report.md`` and ``grid_asr.png`` over a multirun."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid_dir / "grid.csv", _csv([r for s in summaries for r in _fold_rows(s)]))
    atomic_write_text(grid_dir / "grid_report.md", "# fed-ser grid report\n\n![ASR](grid_asr.png)\n\n" + _tables(summaries))
    _figure(grid_dir / "grid_asr.png", summaries)
