"""Readable results: CSV, Markdown tables shaped like the paper's, and a PNG figure."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from fed_ser.io import atomic_write_bytes, atomic_write_text

# The paper's Table IV (ASR, Emo-Base) and Table III (SER UAR, Emo-Base), for comparison.
PAPER_ASR = {("iemocap", "fedsgd"): 0.8933, ("iemocap", "fedavg"): 0.8745, ("crema_d", "fedsgd"): 0.7387,
             ("crema_d", "fedavg"): 0.8198, ("msp_improv", "fedsgd"): 0.9136, ("msp_improv", "fedavg"): 0.8286}
PAPER_UAR = {("iemocap", "fedsgd"): 0.6162, ("iemocap", "fedavg"): 0.6125, ("crema_d", "fedsgd"): 0.6424,
             ("crema_d", "fedavg"): 0.6638, ("msp_improv", "fedsgd"): 0.4723, ("msp_improv", "fedavg"): 0.4767}


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Write ``fig`` as a PNG atomically and free it (``rect``: the area the axes may fill)."""
    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _label(summary: dict, name: str) -> str:
    """How reports name an evaluation: the label its attack gave, else its name."""
    return summary.get("attack_labels", {}).get(name, name)


def _main_attacks(summary: dict) -> dict[str, dict]:
    """The evaluations reported as attacks (per-layer variants, ``name@layer``, have their own table)."""
    return {n: m for n, m in summary["attacks"].items() if "@" not in n}


def _pp(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def _ci_pp(ci: list | None) -> str:
    if not ci or ci[0] is None or ci[0] != ci[0]:
        return ""
    return f" [{_pp(ci[0])}, {_pp(ci[1])}]"


def _ci(m: dict, k: str | None = None) -> str:
    return _ci_pp(m["asr_ci"] if k is None else m["asr_pooled_ci"][k])


def _num(x: float | None, pct: bool = False) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _tpr(m: dict, t: str) -> str:
    v = m["tpr_at_fpr"].get(t)
    return (m.get("tpr_note", {}).get(t) or "n/a") if v is None else f"{100 * v:.0f}%"


def _population(m: dict) -> str:
    return f"{m['speakers']} ({m['women_speakers']} F / {m['men_speakers']} M) | {m['clients']} ({m['women_clients']} F / {m['men_clients']} M)"


def _control(m: dict) -> str:
    c = m.get("control")
    if not c:
        return "- | -"
    flag = " **above chance**" if c["above_chance"] else " (one relabelling: cannot tell)" if c["above_chance"] is None else ""
    p = m.get("p_value")
    return f"{_pp(c['balanced'])}{_ci_pp(c['balanced_ci'])}{flag} | {'n/a' if p is None else f'{p:.3f}'} ({m['permutations']})"


def _fold_rows(summary: dict) -> list[dict]:
    rows = []
    for f in summary["folds"]:
        for name, m in f["attacks"].items():
            rows.append({"private": f["private"], "shadow_mode": f["shadow_mode"], "shadow": "+".join(f["shadow"]),
                         "algorithm": f["algorithm"], "features": f["features"], "fold": f["fold"], "attack": name,
                         "ser_uar": f["ser"]["test_uar"], "asr": m["asr"], "asr_ci_low": m["asr_ci"][0],
                         "asr_ci_high": m["asr_ci"][1], "balanced": m["balanced"], "balanced_ci_low": m["balanced_ci"][0],
                         "balanced_ci_high": m["balanced_ci"][1], "majority": m["majority"], "auc": m["auc"],
                         "auc_ci_low": m["auc_ci"][0], "auc_ci_high": m["auc_ci"][1],
                         **{f"tpr_at_fpr{t}": v for t, v in m["tpr_at_fpr"].items()},
                         **{f"asr_pool{k}": v for k, v in m["asr_pooled"].items() if k != "1"},
                         **{f"balanced_pool{k}": v for k, v in m["balanced_pooled"].items() if k != "1"},
                         "control_balanced": (m.get("control") or {}).get("balanced"), "p_value": m.get("p_value"),
                         "permutations": m.get("permutations"), "speakers": m["speakers"], "clients": m["clients"],
                         "women_speakers": m["women_speakers"], "men_speakers": m["men_speakers"], "updates": m["updates"]})
    return rows


def _cell_name(s: dict) -> str:
    return f"{s['private_corpus']} {s['algorithm']} ({s['shadow_mode']})"


def _figure(path: Path, summaries: list[dict]) -> None:
    """Balanced accuracy with its speaker-level 95% interval per cell and attack (hatched: its control;
    dashed: chance; dotted ticks: the paper's ASR where it has one)."""
    plt = _pyplot()

    names = list(dict.fromkeys(n for s in summaries for n in _main_attacks(s)))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(summaries) * max(len(names), 1) / 2), 4.0))
    width = 0.8 / max(2 * len(names), 1)
    for j, name in enumerate(names):
        for control in (False, True):
            xs, ys, err = [], [], [[], []]
            for i, s in enumerate(summaries):
                m = s["attacks"].get(name)
                m = (m or {}).get("control") if control else m
                if not m or m["balanced"] is None:
                    continue
                xs.append(i + (2 * j + control) * width)
                ys.append(m["balanced"])
                lo, hi = m["balanced_ci"]
                err[0].append(m["balanced"] - (lo if lo is not None else m["balanced"]))
                err[1].append((hi if hi is not None else m["balanced"]) - m["balanced"])
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=3, color=f"C{j}", alpha=0.45 if control else 0.9,
                       hatch="//" if control else None,
                       label=_label(summaries[0], name) + (" - control (relabelled speakers)" if control else ""))
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(summaries))], [_cell_name(s).replace(" (", "\n(") for s in summaries],
                  fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("balanced accuracy (95% CI over speakers)")
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title("Gender inference from shared updates (dashed: chance)")
    _save_png(fig, path)


def _roc_figure(path: Path, summaries: list[dict]) -> None:
    """ROC curve of every cell's attacks over one score per attacked client, log-scaled FPR too."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for s in summaries:
        for name, m in _main_attacks(s).items():
            if not m["roc"]["fpr"]:
                continue
            label = f"{_cell_name(s)}: {_label(s, name)} (AUC {_num(m['auc'])}, {m['men_speakers']} men)"
            for ax in axes:
                ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=label)
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([1e-3, 1], [1e-3, 1], color="k", lw=0.8, ls="--")
        ax.set_xscale(scale)
        ax.set_xlim(1e-3 if scale == "log" else 0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"false positive rate ({scale}; clients)")
        ax.set_ylabel("true positive rate (women found)")
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("ROC over attacked clients (one score each: its updates averaged; dashed: chance)")
    _save_png(fig, path)


STATISTICS_NOTE = (
    "ASR: the paper's metric, the share of 10 random single updates per client whose gender is inferred right, "
    "averaged over clients. Balanced: the mean of the women's and the men's ASR (a population unbalanced by gender "
    "cannot raise it); majority: what always guessing the majority gender scores. Intervals: 95%, a bootstrap over "
    "speakers (a speaker's clients, and a speaker attacked in several folds, resampled together; balanced accuracy and "
    "AUC within gender), or Clopper-Pearson over speakers where all agree. AUC and TPR at 10% / 1% FPR: over one score "
    "per client (its updates' scores averaged), TPR only where at least 10 / 100 men are attacked. Control: the same "
    "attack fitted on the attacker's speakers relabelled (genders shuffled across speakers, the true labelling and its "
    "inverse excluded), its balanced accuracy averaged; p: the share of relabellings that do as well as the attack "
    "(with it counted; the number of relabellings in brackets, so p >= 1/(n+1)).")


def _attack_table(summaries: list[dict]) -> list[str]:
    ks = list(dict.fromkeys(k for s in summaries for m in _main_attacks(s).values() for k in m["asr_pooled"] if k != "1"))
    lines = ["| private corpus | algorithm | threat model | attack | ASR [95% CI] | balanced [95% CI] | majority | AUC [95% CI] "
             "| TPR@10%FPR | TPR@1%FPR | " + " | ".join(f"k={k}: balanced [95% CI]" for k in ks)
             + " | control balanced [95% CI] | p (relabellings) | speakers | clients | paper ASR |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(ks) + "---|---|---|---|---|"]
    for s in summaries:
        for name, m in _main_attacks(s).items():
            pooled = " | ".join(f"{_pp(m['balanced_pooled'].get(k))}{_ci_pp(m['balanced_pooled_ci'].get(k))}"
                                if k in m["balanced_pooled"] else "-" for k in ks)
            paper = _pct(PAPER_ASR.get((s["private"], s["algorithm"]))) if name == "cnn" else ""
            lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {s['shadow_mode']} | {_label(s, name)} | "
                         f"{_pp(m['asr'])}{_ci(m)} | {_pp(m['balanced'])}{_ci_pp(m['balanced_ci'])} | {_pp(m['majority'])} | "
                         f"{_num(m['auc'])}{_ci_auc(m)} | {_tpr(m, '0.1')} | {_tpr(m, '0.01')} | "
                         + (pooled + " | " if ks else "") + f"{_control(m)} | {_population(m)} | {paper} |")
    return lines


def _ci_auc(m: dict) -> str:
    lo, hi = m.get("auc_ci") or [None, None]
    return "" if lo is None else f" [{lo:.2f}, {hi:.2f}]"


def _layer_table(summaries: list[dict]) -> list[str]:
    layered = [(s, n, m) for s in summaries for n, m in s["attacks"].items() if "@" in n]
    if not layered:
        return []
    lines = ["", "## Per-layer analysis (Table V shape): each layer's attack alone, without fusion", "",
             "| private corpus | algorithm | threat model | attack @ layer | ASR [95% CI] | balanced [95% CI] | AUC |",
             "|---|---|---|---|---|---|---|"]
    for s, n, m in layered:
        lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {s['shadow_mode']} | {n} | {_pp(m['asr'])}{_ci(m)} | "
                     f"{_pp(m['balanced'])}{_ci_pp(m['balanced_ci'])} | {_num(m['auc'])} |")
    return lines


def _ser_cell(ser: dict) -> str:
    ci = ser.get("uar_ci")
    return f"{_pct(ser['uar'])}" + ("" if not ci else f" [{_pp(ci[0])}, {_pp(ci[1])}] over {ser['test_speakers']} speakers")


def _tables(summaries: list[dict]) -> str:
    lines = ["## SER performance (Table III shape): held-out speakers, model chosen by client validation UAR", "",
             "UAR interval: a bootstrap over the held-out speakers of the folds pooled; chance is 25% (4 emotions).", "",
             "| private corpus | algorithm | folds | Acc | UAR [95% CI] | paper UAR |", "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {len(s['folds'])} | {_pct(s['ser']['acc'])} | "
                     f"{_ser_cell(s['ser'])} | {_pct(PAPER_UAR.get((s['private'], s['algorithm'])))} |")
    lines += ["", "## Attacks, pooled over the folds' attacked clients (Table IV shape, with balanced accuracy)", "",
              STATISTICS_NOTE, ""] + _attack_table(summaries) + _layer_table(summaries)
    lines += ["", "## Threat models", ""] + [f"- {_cell_name(s)}: {s['threat_model']}." for s in summaries]
    return "\n".join(lines) + "\n"


SYNTHETIC_NOTE = ("**Synthetic corpora.** At least one corpus of this cell is synthetic: generated by fed-ser with a "
                  "chosen gender style (`data.gender_style`, `data.voice`), the same generator for the private and the "
                  "attacker's corpora. Its figures check the pipeline; they are not evidence of how real speech leaks.")


def warnings(summary: dict) -> list[str]:
    """What a reader must know before any figure of a cell: synthetic data, SER at chance, controls above chance."""
    out = []
    if summary.get("synthetic"):
        out.append(SYNTHETIC_NOTE)
    ser = summary.get("ser") or {}
    if ser.get("above_chance") is False:
        lo, hi = ser["uar_ci"]
        out.append(f"**SER at chance.** The SER model's UAR, {_pp(ser['uar_pooled'])}% [{_pp(lo)}, {_pp(hi)}] over "
                   f"{ser['test_speakers']} held-out speakers, is not above chance (25%): the federation did not learn "
                   "the task, and the attacks below read a model that recognises no emotion.")
    for name, m in _main_attacks(summary).items():
        if (m.get("control") or {}).get("above_chance"):
            out.append(f"**Control above chance: {_label(summary, name)}.** Fitted on relabelled speakers it still scores "
                       f"{_pp(m['control']['balanced'])}% balanced accuracy (lower bound {_pp(m['control']['balanced_ci'][0])}%): "
                       "the attack reads something other than what it was trained on.")
    return out


def write_run_report(out: Path, summary: dict) -> None:
    """``results.csv``, ``report.md``, ``asr.png`` and ``roc.png`` for one cell."""
    atomic_write_text(out / "results.csv", _csv(_fold_rows(summary)))
    folds = ", ".join(str(f["fold"]) for f in summary["folds"])
    shadow_folds = sorted({f.get("shadow_fold", f["fold"]) for f in summary["folds"]})
    if summary["shadow_mode"] == "speakers" or len(summary["folds"]) == 1:
        shared = ""
    elif len(shadow_folds) < len(summary["folds"]):
        shared = f" One shadow federation and attack (the attacker's fold {shadow_folds[0]}) serve every fold."
    else:
        shared = " Each fold trains its own shadow federation and attack (`shadow.per_fold=true`)."
    head = (f"# fed-ser attack report: private {summary['private_corpus']}, {summary['algorithm']}, "
            f"{summary['features']}\n\n" + "".join(f"{w}\n\n" for w in warnings(summary))
            + f"{summary['threat_model']}.\n\nFolds: {folds}.{shared} Wall time "
            f"{summary['wall_seconds']:.0f} s.\n\n![balanced accuracy](asr.png)\n\n![ROC](roc.png)\n\n")
    atomic_write_text(out / "report.md", head + _tables([summary]) + _signal_section(summary) + _threshold_section(summary))
    _figure(out / "asr.png", [summary])
    _roc_figure(out / "roc.png", [summary])


def _signal_section(summary: dict) -> str:
    """Where the gender signal is kept or lost: the probes on the attacked clients' own statistics
    beside the feature-space attack (its classifier trained on the attacker's data)."""
    sig, fs = summary.get("signal"), summary["attacks"].get("feature-space")
    if not sig or not fs:
        return ""
    ad = summary["attacks"].get("feature-space-adaptive") or {}
    rows = [("linear probe on the clients' true emotion-conditional means", _pp(sig["probe_true"])),
            ("the same probe on the statistics the inversion recovered", _pp(sig["probe_recovered"])),
            ("the probe on true means, speakers relabelled (chance)", _pp(sig["probe_true_shuffled"])),
            ("feature-space attack, classifier trained on the attacker's data (balanced [95% CI], AUC)",
             f"{_pp(fs['balanced'])}{_ci_pp(fs['balanced_ci'])}, AUC {_num(fs.get('auc'))}")]
    if ad:
        rows.append(("the same, threshold from the attacked clients' score clusters (balanced [95% CI])",
                     f"{_pp(ad['balanced'])}{_ci_pp(ad['balanced_ci'])}"))
    return (f"\n## Where the signal is\n\nProbes cross-validated over the {sig['clients']} attacked clients "
            f"({sig['speakers']} speakers, each in one fold only; balanced accuracy in %), beside the attack:\n\n"
            "| stage | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows))


def _threshold_section(summary: dict) -> str:
    """The adaptive threshold against the attacker's own on attacked populations of other gender mixes."""
    study = summary.get("threshold_study")
    if not study:
        return ""
    lines = ["", "## The adaptive threshold on unbalanced populations", "",
             f"Attacked populations drawn from this cell's clients ({study['draws']} draws each, {study['clients']} "
             "clients a draw); balanced accuracy, mean [2.5%, 97.5%] over the draws, of the feature-space attack at the "
             "attacker's own threshold and at the threshold set between the two clusters of the drawn population's scores. "
             "The headline figure is the attacker's own threshold.", "",
             "| women : men | own threshold | adaptive threshold |", "|---|---|---|"]
    for r in study["rows"]:
        lines.append(f"| {r['mix']} | {_threshold_cell(r['own'])} | {_threshold_cell(r['adaptive'])} |")
    return "\n".join(lines) + "\n"


def _threshold_cell(c: dict) -> str:
    if c.get("asr_only"):
        return f"ASR {_pp(c['mean'])} [{_pp(c['low'])}, {_pp(c['high'])}] (one gender)"
    return f"{_pp(c['mean'])} [{_pp(c['low'])}, {_pp(c['high'])}]"


def write_grid_report(grid_dir: Path, summaries: list[dict]) -> None:
    """``grid.csv``, ``grid_report.md``, ``grid_asr.png`` and ``grid_roc.png`` over a multirun."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid_dir / "grid.csv", _csv([r for s in summaries for r in _fold_rows(s)]))
    notes = "".join(f"- {_cell_name(s)}: {w}\n" for s in summaries for w in warnings(s))
    atomic_write_text(grid_dir / "grid_report.md", "# fed-ser grid report\n\n" + (notes + "\n" if notes else "")
                      + "![balanced accuracy](grid_asr.png)\n\n![ROC](grid_roc.png)\n\n" + _tables(summaries))
    _figure(grid_dir / "grid_asr.png", summaries)
    _roc_figure(grid_dir / "grid_roc.png", summaries)


def _defence_rows(summaries: list[dict]) -> list[dict]:
    rows = []
    for s in summaries:
        d, cnn, profile = s["defence"], s["attacks"].get("cnn") or {}, s["attacks"].get("profile") or {}
        fs = s["attacks"].get("feature-space") or {}
        dp = d["dp_mode"] != "none"
        # balanced accuracies (the tables' figures); the paper's ASR beside them in the CSV
        rows.append({"private": s["private_corpus"], "algorithm": s["algorithm"], "dp_mode": d["dp_mode"],
                     "epsilon": d["dp_epsilon"] if dp else None, "clip": d.get("dp_clip") if dp else None,
                     "spent_epsilon_max": d.get("spent_epsilon_max"), "dropout": d["dropout"], "ser_uar": s["ser"]["uar"],
                     "asr": cnn.get("balanced"), "asr_ci_low": (cnn.get("balanced_ci") or [None])[0],
                     "asr_ci_high": (cnn.get("balanced_ci") or [None, None])[1], "cnn_paper_asr": cnn.get("asr"),
                     **{f"asr_pool{k}": v for k, v in cnn.get("balanced_pooled", {}).items() if k != "1"},
                     **{f"profile_asr_pool{k}": v for k, v in profile.get("balanced_pooled", {}).items()},
                     "fs_asr": fs.get("balanced"), "fs_auc": fs.get("auc")})
    return rows


def _fs_cell(r: dict) -> str:
    """The feature-space attack's ASR and AUC (cells written before it ran: -)."""
    if r.get("fs_asr") is None:
        return "-"
    return f"{_pct(r['fs_asr'])} ({_num(r.get('fs_auc'))})"


def _pool_label(key: str) -> str:
    if key.startswith("profile_asr_pool"):
        k = key[16:]
        return f"profile, {k} round{'s' * (k != '1')}"
    return f"CNN, {key[8:]} rounds"


def _defence_figure(path: Path, rows: list[dict]) -> None:
    """UAR vs epsilon (one line per defence group) and, one panel per group, each attack's ASR vs
    epsilon; dotted lines: the same private corpus and algorithm without DP."""
    plt = _pyplot()

    attacks = ["asr", *(k for k in dict.fromkeys(k for r in rows for k in r)
                        if k.startswith(("asr_pool", "profile_asr_pool"))),
               *(["fs_asr"] if any(r.get("fs_asr") is not None for r in rows) else [])]
    group = lambda r: (r["private"], r["algorithm"], r["dp_mode"], r.get("clip"), r["dropout"])
    groups = list(dict.fromkeys(group(r) for r in rows if r["epsilon"] is not None))
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4.2 * (1 + len(groups)), 4.2), squeeze=False)
    axes = axes[0]
    colours = {k: f"C{i}" for i, k in enumerate(attacks)}
    for i, (private, algorithm, mode, clip, dropout) in enumerate(groups):
        dp = sorted((r for r in rows if group(r) == (private, algorithm, mode, clip, dropout)), key=lambda r: r["epsilon"])
        none = [r for r in rows if r["epsilon"] is None and (r["private"], r["algorithm"], r["dropout"]) == (private, algorithm, dropout)]
        tag = f"{private} {algorithm} {mode}" + (f", clip {clip:g}" if clip is not None else "")
        eps = [r["epsilon"] for r in dp]
        line = axes[0].plot(eps, [r["ser_uar"] for r in dp], "o-", color=f"C{i}", label=tag)[0]
        if none:
            axes[0].axhline(none[0]["ser_uar"], color=line.get_color(), ls=":", lw=1)
        ax = axes[1 + i]
        for k in attacks:
            label = {"asr": "CNN, 1 round", "fs_asr": "feature-space, 1 update"}.get(k) or _pool_label(k)
            ax.plot(eps, [np.nan if r.get(k) is None else r[k] for r in dp], "s--" if k.startswith("profile") else "o-",
                    color=colours[k], label=label)
            if none and none[0].get(k) is not None:
                ax.axhline(none[0][k], color=colours[k], ls=":", lw=1)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_title(f"ASR: {tag}", fontsize=9)
    axes[0].set_title("SER UAR")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (dotted: no DP)")
        ax.set_ylim(0, 1)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    _save_png(fig, path, rect=(0, 0.08, 1, 1))


def write_defense_report(grid_dir: Path, summaries: list[dict]) -> None:
    """``defense.csv``, ``defense_report.md`` (epsilon table; dropout table like the paper's Table VI)
    and ``defense.png`` (UAR and ASR vs epsilon)."""
    rows = _defence_rows(summaries)
    grid_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid_dir / "defense.csv", _csv(rows))
    keys = list(dict.fromkeys(k for r in rows for k in r))  # cells written by older versions lack some
    pools = [k for k in keys if k.startswith("asr_pool")]
    profile = [k for k in keys if k.startswith("profile_asr_pool")]
    head = "| private | algorithm | DP | epsilon (spent) | clip | dropout | SER UAR | CNN balanced | " + " | ".join(
        f"CNN {k[8:]} rounds" for k in pools) + "".join(f" | profile {k[16:]} round{'s' * (k[16:] != '1')}"
                                                         for k in profile) + " | feature-space balanced (AUC) |"
    lines = ["# Defences: DP and dropout", "", "Every attack figure is a balanced accuracy (the mean of the women's and "
             "the men's ASR; the CSV also has the CNN's paper ASR). Attacks on the first layer (dense1) updates, from one round and "
             "pooled over several rounds of the same client: the paper's CNN (k rounds: mean prediction) and the "
             "input-profile attack (attacks/inference/profile.py; k rounds: mean profile, which averages DP noise away); "
             "the feature-space attack (attacks/inference/feature_space.py: each update inverted, the client's recovered "
             "statistics classified; one update, its ROC AUC over updates).", "",
             head, "|" + "---|" * (9 + len(pools) + len(profile))]
    key = lambda r: (r["private"], r["algorithm"], r["dp_mode"] == "none", r["epsilon"] or 0, r.get("clip") or 0,
                     r["dropout"])
    for r in sorted(rows, key=key):
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g} ({r['spent_epsilon_max']:.2f})" \
            if r["spent_epsilon_max"] is not None else f"{r['epsilon']:g}"
        clip = "-" if r.get("clip") is None else f"{r['clip']:g}"
        lines.append(f"| {r['private']} | {r['algorithm']} | {r['dp_mode']} | {eps} | {clip} | {r['dropout']:g} | "
                     f"{_pct(r['ser_uar'])} | {_pct(r['asr'])} | " + "".join(f"{_pct(r.get(k))} | " for k in pools + profile)
                     + f"{_fs_cell(r)} |")
    nodp = [r for r in rows if r["dp_mode"] == "none"]
    if len({r["dropout"] for r in nodp}) > 1:
        lines += ["", "## Dropout (shaped like the paper's Table VI)", "",
                  "| private | algorithm | dropout | SER UAR | CNN balanced | feature-space balanced (AUC) |", "|---|---|---|---|---|---|"]
        for r in sorted(nodp, key=lambda r: (r["private"], r["algorithm"], r["dropout"])):
            lines.append(f"| {r['private']} | {r['algorithm']} | {r['dropout']:g} | {_pct(r['ser_uar'])} | {_pct(r['asr'])} | "
                         f"{_fs_cell(r)} |")
    lines += ["", "![UAR and ASR vs epsilon](defense.png)", ""]
    atomic_write_text(grid_dir / "defense_report.md", "\n".join(lines))
    if any(r["epsilon"] is not None for r in rows):
        _defence_figure(grid_dir / "defense.png", rows)


def _robust_figure(path: Path, rows: list[dict]) -> None:
    plt = _pyplot()

    attacks = sorted({r["attack"] for r in rows})
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 3.6), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for model in dict.fromkeys(r["model"] for r in rows):
            rs = sorted((r for r in rows if r["model"] == model and r["attack"] == attack), key=lambda r: r["epsilon"])
            ax.plot([r["epsilon"] for r in rs], [r["robust_uar"] for r in rs], marker="o", label=model)
        ax.axhline(0.25, color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"epsilon ({rows[0]['norm']})")
        ax.set_ylabel("SER UAR under attack")
        ax.set_title(attack.upper())
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    _save_png(fig, path)


def write_robust_report(out: Path, result: dict) -> None:
    """``robust.csv``, ``robust_report.md`` (robust UAR per model, attack and epsilon) and ``robust.png``."""
    rows = result["rows"]
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else -1)
    atomic_write_text(out / "robust.csv", _csv([{k: r.get(k) for k in fields} for r in rows]))
    epsilons = sorted({r["epsilon"] for r in rows})
    adv, rand = result["adversarial_training"], result["randomization"]
    lines = [f"# Adversarial robustness: {result['dataset']}, {result['algorithm']}, fold {result['fold']}", "",
             f"SER UAR on {result['test_utterances']} held-out utterances under white-box attacks on the input features "
             f"({rows[0]['norm']} ball). Adversarial training: {adv['method']} {adv['norm']} epsilon {adv['epsilon']}, "
             f"{adv['steps']} steps, {adv['mix']:.0%} of each batch. Randomisation: {rand['transform']} "
             f"(strength {rand['strength']}, {rand['draws']} draws); it is attacked adaptively (expectation over "
             f"{result['eot_draws']} transformations) and statically; the table gives the worse.", "",
             "| model | attack | clean UAR | " + " | ".join(f"eps {e:g}" for e in epsilons) + " |",
             "|---|---|---|" + "---|" * len(epsilons)]
    for (model, attack) in dict.fromkeys((r["model"], r["attack"]) for r in rows):
        by_eps = {r["epsilon"]: r for r in rows if r["model"] == model and r["attack"] == attack}
        clean = next(iter(by_eps.values()))["clean_uar"]
        lines.append(f"| {model} | {attack} | {_pct(clean)} | "
                     + " | ".join(_pct(by_eps[e]["robust_uar"]) if e in by_eps else "-" for e in epsilons) + " |")
    rr = [r for r in rows if "adaptive_uar" in r]
    if rr:
        lines += ["", "Randomised model, adaptive (EOT) vs static attack:", "",
                  "| attack | epsilon | adaptive UAR | static UAR |", "|---|---|---|---|"]
        lines += [f"| {r['attack']} | {r['epsilon']:g} | {_pct(r['adaptive_uar'])} | {_pct(r['static_uar'])} |" for r in rr]
    lines += ["", "![robust UAR vs epsilon](robust.png)", ""]
    atomic_write_text(out / "robust_report.md", "\n".join(lines))
    _robust_figure(out / "robust.png", rows)


def _eps(x: float | None) -> str:
    return "none (inf)" if x is None else f"{x:.3g}"


def _threat_row(name: str, s: dict) -> dict:
    a = s["attacks"]
    row = {"defence": name, "ser_uar": s["ser"]["uar"], "epsilon_server": s.get("epsilon_server"),
           "epsilon_aggregate": s.get("epsilon_aggregate"), "guarantee": s.get("guarantee", ""),
           "seconds_per_round": s.get("seconds_per_round")}
    for attack, col in (("feature-space", "server_fs"), ("server-sum-differencing", "server_fs"), ("cnn", "server_cnn"),
                        ("profile", "server_profile"), ("aggregate-observer", "aggregate")):
        m = a.get(attack)
        if m is not None:
            row.update({f"{col}_asr": m["balanced"], f"{col}_lo": m["balanced_ci"][0], f"{col}_hi": m["balanced_ci"][1],
                        f"{col}_paper_asr": m["asr"], f"{col}_speakers": m["speakers"], f"{col}_p": m.get("p_value"),
                        f"{col}_auc": m["auc"], f"{col}_tpr1": m.get("tpr_at_fpr", {}).get("0.01")})
    return row


def write_threat_report(out: Path, cells: dict[str, dict], title: str) -> None:
    """The threat-model matrix: ``matrix.md``, ``matrix.csv``, ``matrix.json`` rows and ``asr_vs_epsilon.png``."""
    rows = [_threat_row(name, s) for name, s in cells.items()]

    def cell(r: dict, col: str) -> str:
        if f"{col}_asr" not in r:
            return "n/a"
        p = r.get(f"{col}_p")
        return (f"{_pp(r[f'{col}_asr'])}{_ci_pp([r[f'{col}_lo'], r[f'{col}_hi']])}, AUC {_num(r[f'{col}_auc'])}"
                + ("" if p is None else f", p {p:.2f}"))

    lines = [f"# Threat-model matrix: {title}", "",
             "Rows: defences. Observers: the server (the paper's attacker: every update as received) and an observer of the "
             "round sums only (what SecAgg+ reveals to the server, and what the global models reveal to anyone; central DP "
             "noise included). Cells: balanced accuracy % [95% CI over speakers], ROC AUC over one score per client, "
             "permutation p-value of the control. Epsilon: at the run's delta, "
             "max over clients, against that observer (none: no guarantee). SecAgg+ rows: the server sees the round sums "
             "only; its feature-space cell is the differencing attack on the sums it unmasks, before any noise it adds, "
             "and the aggregates column reads the global models.", "",
             "| defence | SER UAR | server: feature-space | server: CNN | server: profile | aggregates: differencing "
             "| epsilon vs server | epsilon vs aggregates | s/round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['defence']} | {_num(r['ser_uar'], True)} | {cell(r, 'server_fs')} | {cell(r, 'server_cnn')} | "
                     f"{cell(r, 'server_profile')} | {cell(r, 'aggregate')} | {_eps(r['epsilon_server'])} | "
                     f"{_eps(r['epsilon_aggregate'])} | {_num(r['seconds_per_round'])} |")
    lines += ["", "What each epsilon guarantees:", ""] + [f"- {r['defence']}: {r['guarantee'] or 'no DP'}" for r in rows]
    atomic_write_text(out / "matrix.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "matrix.csv", _csv(rows))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.6, 4.2))
    colours = {r["defence"]: f"C{i % 10}" for i, r in enumerate(rows)}  # one colour per defence, one marker per observer
    for col, marker, label in (("server_fs", "o", "server, feature-space"), ("aggregate", "s", "aggregates, differencing")):
        for r in rows:
            if f"{col}_asr" not in r or r[f"{col}_asr"] is None or r[f"{col}_lo"] is None:
                continue
            eps = r["epsilon_server"] if col.startswith("server") else r["epsilon_aggregate"]
            x = 1e4 if eps is None else eps
            ax.errorbar([x], [100 * r[f"{col}_asr"]], yerr=[[100 * (r[f"{col}_asr"] - r[f"{col}_lo"])], [100 * (r[f"{col}_hi"] - r[f"{col}_asr"])]],
                        fmt=marker, capsize=3, color=colours[r["defence"]], alpha=0.85, label=f"{r['defence']} ({label})")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon against that observer (1e4: no guarantee)")
    ax.set_ylabel("balanced accuracy % (95% CI over speakers)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save_png(fig, out / "asr_vs_epsilon.png")
