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


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Write ``fig`` as a PNG atomically and free it (``rect``: the area the axes may fill)."""
    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def csv_text(rows: list[dict]) -> str:
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


def pp(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def ci_pp(ci: list | None) -> str:
    if not ci or ci[0] is None or ci[0] != ci[0]:
        return ""
    return f" [{pp(ci[0])}, {pp(ci[1])}]"


def _ci(m: dict, k: str | None = None) -> str:
    return ci_pp(m["asr_ci"] if k is None else m["asr_pooled_ci"][k])


def num(x: float | None, pct: bool = False) -> str:
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
    return f"{pp(c['balanced'])}{ci_pp(c['balanced_ci'])}{flag} | {'n/a' if p is None else f'{p:.3f}'} ({m['permutations']})"


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
    plt = pyplot()

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
    save_png(fig, path)


def _roc_figure(path: Path, summaries: list[dict]) -> None:
    """ROC curve of every cell's attacks over one score per attacked client, log-scaled FPR too."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for s in summaries:
        for name, m in _main_attacks(s).items():
            if not m["roc"]["fpr"]:
                continue
            label = f"{_cell_name(s)}: {_label(s, name)} (AUC {num(m['auc'])}, {m['men_speakers']} men)"
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
    save_png(fig, path)


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
            pooled = " | ".join(f"{pp(m['balanced_pooled'].get(k))}{ci_pp(m['balanced_pooled_ci'].get(k))}"
                                if k in m["balanced_pooled"] else "-" for k in ks)
            paper = pct(PAPER_ASR.get((s["private"], s["algorithm"]))) if name == "cnn" else ""
            const = " (one score for all: reads nothing)" if m.get("constant") else ""
            lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {s['shadow_mode']} | {_label(s, name)}{const} | "
                         f"{pp(m['asr'])}{_ci(m)} | {pp(m['balanced'])}{ci_pp(m['balanced_ci'])} | {pp(m['majority'])} | "
                         f"{num(m['auc'])}{_ci_auc(m)} | {_tpr(m, '0.1')} | {_tpr(m, '0.01')} | "
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
        lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {s['shadow_mode']} | {n} | {pp(m['asr'])}{_ci(m)} | "
                     f"{pp(m['balanced'])}{ci_pp(m['balanced_ci'])} | {num(m['auc'])} |")
    return lines


def _ser_cell(ser: dict) -> str:
    ci = ser.get("uar_ci")
    if not ci:  # no per-speaker counts: the folds' mean, alone
        return pct(ser["uar"])
    # the interval's own point: UAR over the held-out speakers pooled (the folds' mean weighs folds, not speakers)
    return f"{pct(ser['uar_pooled'])} [{pp(ci[0])}, {pp(ci[1])}] over {ser['test_speakers']} speakers"


def _tables(summaries: list[dict]) -> str:
    lines = ["## SER performance (Table III shape): held-out speakers, model chosen by client validation UAR", "",
             "UAR interval: a bootstrap over the held-out speakers of the folds pooled; chance is 25% (4 emotions).", "",
             "| private corpus | algorithm | folds | Acc | UAR [95% CI] | paper UAR |", "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {len(s['folds'])} | {pct(s['ser']['acc'])} | "
                     f"{_ser_cell(s['ser'])} | {pct(PAPER_UAR.get((s['private'], s['algorithm'])))} |")
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
        out.append(f"**SER at chance.** The SER model's UAR, {pp(ser['uar_pooled'])}% [{pp(lo)}, {pp(hi)}] over "
                   f"{ser['test_speakers']} held-out speakers, is not above chance (25%): the federation did not learn "
                   "the task, and the attacks below read a model that recognises no emotion.")
    for name, m in _main_attacks(summary).items():
        if (m.get("control") or {}).get("above_chance"):
            out.append(f"**Control above chance: {_label(summary, name)}.** Fitted on relabelled speakers it still scores "
                       f"{pp(m['control']['balanced'])}% balanced accuracy (lower bound {pp(m['control']['balanced_ci'][0])}%): "
                       "the attack reads something other than what it was trained on.")
    return out


def write_run_report(out: Path, summary: dict) -> None:
    """``results.csv``, ``report.md``, ``asr.png`` and ``roc.png`` for one cell."""
    atomic_write_text(out / "results.csv", csv_text(_fold_rows(summary)))
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
    atomic_write_text(out / "report.md", head + _tables([summary]) + _not_run(summary) + _inversion_section(summary)
                      + _signal_section(summary) + _threshold_section(summary))
    _figure(out / "asr.png", [summary])
    _roc_figure(out / "roc.png", [summary])


def _not_run(summary: dict) -> str:
    """The attacks that could not run on some fold, and why (a diverged shadow federation, nothing inverted...)."""
    lines = [f"- fold {f['fold']}: {name}: {d['not_run']}" for f in summary["folds"]
             for name, d in (f.get("attack_fits") or {}).items() if "not_run" in d]
    return "\n## Attacks not run\n\n" + "\n".join(lines) + "\n" if lines else ""


def _inversion_section(summary: dict) -> str:
    """How much of the attacked clients' utterances the inversion recovered, summed over the folds (checked
    against their true rows: evaluation only)."""
    inv = [f["inversion"] for f in summary["folds"] if f.get("inversion")]
    if not inv:
        return ""
    total = lambda k: sum(int(i.get(k, 0)) for i in inv)
    n = max(total("utterances_in_batches"), 1)
    share = lambda k: f"{total(k)} ({100 * total(k) / n:.1f}%)"
    rows = [("utterances behind the inverted updates", str(total("utterances_in_batches"))),
            ("returned by the inversion", share("recovered")),
            ("exactly (max-abs error < 0.1% of the largest feature)", share("recovered_exactly"))]
    if any("recovered_within_10pct" in i for i in inv):
        rows += [("within 10% relative L2 error of a true utterance", share("recovered_within_10pct")),
                 ("within 25%", share("recovered_within_25pct")),
                 ("with >= 95% of the signs of a true utterance", share("recovered_signs_95pct"))]
    signs = all(i.get("sign_patterns_only") for i in inv)
    seconds = sum(float(i.get("seconds", 0.0)) for i in inv)
    note = (" Several local Adam steps leave only each sample's sign pattern: the inversion returns signs, and the "
            "feature-space classifier learns on the signs of the attacker's features." if signs else "")
    return (f"\n## What the inversion recovered\n\n{total('updates')} updates inverted in {seconds:.0f} s "
            f"({seconds / max(total('updates'), 1):.2f} s an update).{note} Utterances are counted per update (a client's "
            "utterance recovered from two updates counts twice).\n\n| recovered | utterances |\n|---|---|\n"
            + "".join(f"| {a} | {b} |\n" for a, b in rows))


def _signal_section(summary: dict) -> str:
    """Where the gender signal is kept or lost: the probes on the attacked clients' own statistics
    beside the feature-space attack (its classifier trained on the attacker's data)."""
    sig, fs = summary.get("signal"), summary["attacks"].get("feature-space")
    if not sig or not fs:
        return ""
    ad = summary["attacks"].get("feature-space-adaptive") or {}
    rows = [("linear probe on the clients' true emotion-conditional means", pp(sig["probe_true"])),
            *([("the same probe on the means of their features' signs (all several Adam steps leave)", pp(sig["probe_true_signs"]))]
              if sig.get("probe_true_signs") is not None else []),
            ("the same probe on the statistics the inversion recovered", pp(sig["probe_recovered"])),
            ("the probe on true means, speakers relabelled (chance)", pp(sig["probe_true_shuffled"])),
            ("feature-space attack, classifier trained on the attacker's data (balanced [95% CI], AUC)",
             f"{pp(fs['balanced'])}{ci_pp(fs['balanced_ci'])}, AUC {num(fs.get('auc'))}")]
    if ad:
        rows.append(("the same, threshold from the attacked clients' score clusters (balanced [95% CI])",
                     f"{pp(ad['balanced'])}{ci_pp(ad['balanced_ci'])}"))
    return (f"\n## Where the signal is\n\nProbes cross-validated over the {sig['clients']} attacked clients "
            f"({sig['speakers']} speakers, each in one fold only; balanced accuracy in %), beside the attack:\n\n"
            "| stage | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows))


def _threshold_section(summary: dict) -> str:
    """The adaptive threshold against the attacker's own on attacked populations of other gender mixes."""
    study = summary.get("threshold_study")
    if not study:
        return ""
    lines = ["", "## The adaptive threshold on unbalanced populations", "",
             f"Attacked populations drawn from this cell's {study['women']} women's and {study['men']} men's clients "
             f"({study['draws']} draws each); balanced accuracy, mean [2.5%, 97.5%] over the draws, of the feature-space attack at the "
             "attacker's own threshold and at the threshold set between the two clusters of the drawn population's scores. "
             "The headline figure is the attacker's own threshold.", "",
             "| women : men | clients | own threshold | adaptive threshold |", "|---|---|---|---|"]
    for r in study["rows"]:
        lines.append(f"| {r['mix']} | {r.get('clients', '')} | {_threshold_cell(r['own'])} | {_threshold_cell(r['adaptive'])} |")
    return "\n".join(lines) + "\n"


def _threshold_cell(c: dict) -> str:
    if c.get("asr_only"):
        return f"ASR {pp(c['mean'])} [{pp(c['low'])}, {pp(c['high'])}] (one gender)"
    return f"{pp(c['mean'])} [{pp(c['low'])}, {pp(c['high'])}]"


def write_grid_report(grid_dir: Path, summaries: list[dict]) -> None:
    """``grid.csv``, ``grid_report.md``, ``grid_asr.png`` and ``grid_roc.png`` over a multirun."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid_dir / "grid.csv", csv_text([r for s in summaries for r in _fold_rows(s)]))
    notes = "".join(f"- {_cell_name(s)}: {w}\n" for s in summaries for w in warnings(s))
    atomic_write_text(grid_dir / "grid_report.md", "# fed-ser grid report\n\n" + (notes + "\n" if notes else "")
                      + "![balanced accuracy](grid_asr.png)\n\n![ROC](grid_roc.png)\n\n" + _tables(summaries))
    _figure(grid_dir / "grid_asr.png", summaries)
    _roc_figure(grid_dir / "grid_roc.png", summaries)
