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


ATTACK_NAMES = {"cnn": "paper's CNN (fused)", "profile": "input profile", "feature-space": "feature-space (inversion)",
                "feature-space-adaptive": "feature-space, threshold from the attacked clients' score clusters",
                "aggregate-observer": "observer of aggregates (round-sum inversion + differencing)"}


def _attack_label(name: str) -> str:
    base, control = (name[:-8], True) if name.endswith("-control") else (name, False)
    return ATTACK_NAMES.get(base, base) + (" - control (shuffled genders)" if control else "")


def _ci(m: dict, k: str | None = None) -> str:
    lo, hi = m["asr_ci"] if k is None else m["asr_pooled_ci"][k]
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _num(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _fold_rows(summary: dict) -> list[dict]:
    rows = []
    for f in summary["folds"]:
        for name, m in f["attacks"].items():
            row = {"private": f["private"], "shadow_mode": f["shadow_mode"], "shadow": "+".join(f["shadow"]),
                   "algorithm": f["algorithm"], "features": f["features"], "fold": f["fold"], "attack": name,
                   "ser_uar": f["ser"]["test_uar"], "asr": m["asr"], "asr_ci_low": m["asr_ci"][0],
                   "asr_ci_high": m["asr_ci"][1], "auc": m["auc"], **{f"tpr_at_fpr{t}": v for t, v in m["tpr_at_fpr"].items()},
                   **{f"asr_pool{k}": v for k, v in m["asr_pooled"].items() if k != "1"},
                   "clients": m["clients"], "updates": m["updates"]}
            if name == "cnn":
                row.update({f"asr_{l}": v for l, v in f["asr_per_layer"].items()})
            rows.append(row)
    return rows


def _cell_name(s: dict) -> str:
    return f"{s['private_corpus']} {s['algorithm']} ({s['shadow_mode']})"


def _figure(path: Path, summaries: list[dict]) -> None:
    """ASR with its 95% interval per cell and attack (dashed: chance)."""
    plt = _pyplot()

    names = list(dict.fromkeys(n for s in summaries for n in s["attacks"]))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(summaries) * max(len(names), 1) / 2), 4.0))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs, ys, err = [], [], [[], []]
        for i, s in enumerate(summaries):
            m = s["attacks"].get(name)
            if m is None:
                continue
            xs.append(i + j * width)
            ys.append(m["asr"])
            err[0].append(m["asr"] - m["asr_ci"][0])
            err[1].append(m["asr_ci"][1] - m["asr"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=_attack_label(name), hatch="//" if "control" in name else None)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(summaries))], [_cell_name(s).replace(" (", "\n(") for s in summaries],
                  fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("attack success rate (95% CI)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title("Gender inference from shared updates (dashed: chance)")
    _save_png(fig, path)


def _roc_figure(path: Path, summaries: list[dict]) -> None:
    """ROC curve of every cell's attacks (single updates), log-scaled FPR to show the low-FPR regime."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for s in summaries:
        for name, m in s["attacks"].items():
            if not m["roc"]["fpr"]:
                continue
            label = f"{_cell_name(s)}: {_attack_label(name)} (AUC {_num(m['auc'])})"
            for ax in axes:
                ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], ls=":" if "control" in name else "-", label=label)
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([1e-3, 1], [1e-3, 1], color="k", lw=0.8, ls="--")
        ax.set_xscale(scale)
        ax.set_xlim(1e-3 if scale == "log" else 0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"false positive rate ({scale})")
        ax.set_ylabel("true positive rate (women found)")
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("ROC of the attacks on single updates (dashed: chance)")
    _save_png(fig, path)


def _tables(summaries: list[dict]) -> str:
    lines = ["## SER performance (Table III shape): held-out speakers, model chosen by client validation UAR", "",
             "| private corpus | algorithm | folds | Acc | UAR | paper UAR |", "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {len(s['folds'])} | {_pct(s['ser']['acc'])} | "
                     f"{_pct(s['ser']['uar'])} | {_pct(PAPER_UAR.get((s['private'], s['algorithm'])))} |")
    ks = list(dict.fromkeys(k for s in summaries for m in s["attacks"].values() for k in m["asr_pooled"] if k != "1"))
    lines += ["", "## Attack success rate (Table IV shape), pooled over the folds' attacked clients", "",
              "ASR: share of 10 random single updates per client whose gender is inferred right, averaged over "
              "clients; 95% interval: bootstrap over attacked clients. AUC and TPR at 10% / 1% FPR: the "
              "attack's score on single updates. k rounds: k updates of a client pooled.", "",
              "| private corpus | algorithm | threat model | attack | ASR [95% CI] | AUC | TPR@10%FPR | TPR@1%FPR | "
              + " | ".join(f"k={k} [95% CI]" for k in ks) + " | clients | paper ASR |",
              "|---|---|---|---|---|---|---|---|" + "---|" * len(ks) + "---|---|"]
    for s in summaries:
        for name, m in s["attacks"].items():
            t = m["tpr_at_fpr"]
            lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {s['shadow_mode']} | {_attack_label(name)} | "
                         f"{_num(m['asr'], True)} {_ci(m)} | {_num(m['auc'])} | {_num(t.get('0.1'), True)} | "
                         f"{_num(t.get('0.01'), True)} | "
                         + " | ".join(f"{_num(m['asr_pooled'].get(k), True)} {_ci(m, k) if k in m['asr_pooled'] else ''}"
                                      for k in ks)
                         + f" | {m['clients']} | {_pct(PAPER_ASR.get((s['private'], s['algorithm']))) if name == 'cnn' else ''} |")
    layer_names = list(summaries[0]["asr_per_layer"])
    lines += ["", "## Per-layer ASR of the paper's CNN without fusion (Table V shape), mean over folds", "",
              "| private corpus | algorithm | threat model | " + " | ".join(layer_names) + " |",
              "|---|---|---|" + "---|" * len(layer_names)]
    for s in summaries:
        lines.append(f"| {s['private_corpus']} | {s['algorithm']} | {s['shadow_mode']} | "
                     + " | ".join(_num(v, True) for v in s["asr_per_layer"].values()) + " |")
    lines += ["", "## Threat models", ""] + [f"- {_cell_name(s)}: {s['threat_model']}." for s in summaries]
    return "\n".join(lines) + "\n"


def write_run_report(out: Path, summary: dict, suffix: str = "") -> None:
    """``results<suffix>.csv``, ``report<suffix>.md``, ``asr<suffix>.png`` and ``roc<suffix>.png`` for one cell."""
    atomic_write_text(out / f"results{suffix}.csv", _csv(_fold_rows(summary)))
    folds = ", ".join(str(f["fold"]) for f in summary["folds"])
    shadow_folds = sorted({f.get("shadow_fold", f["fold"]) for f in summary["folds"]})
    if summary["shadow_mode"] == "speakers" or len(summary["folds"]) == 1:
        shared = ""
    elif len(shadow_folds) < len(summary["folds"]):
        shared = f" One shadow federation and attack (the attacker's fold {shadow_folds[0]}) serve every fold."
    else:
        shared = " Each fold trains its own shadow federation and attack (`shadow.per_fold=true`)."
    head = (f"# fed-ser attack report: private {summary['private_corpus']}, {summary['algorithm']}, "
            f"{summary['features']}\n\n{summary['threat_model']}.\n\nFolds: {folds}.{shared} Wall time "
            f"{summary['wall_seconds']:.0f} s.\n\n![ASR](asr{suffix}.png)\n\n![ROC](roc{suffix}.png)\n\n")
    atomic_write_text(out / f"report{suffix}.md", head + _tables([summary]) + _signal_section(summary))
    _figure(out / f"asr{suffix}.png", [summary])
    _roc_figure(out / f"roc{suffix}.png", [summary])


def _signal_section(summary: dict) -> str:
    """Where the gender signal is kept or lost: the probes on the attacked clients' own statistics
    beside the feature-space attack (its classifier trained on the attacker's data)."""
    sig, fs = summary.get("signal"), summary["attacks"].get("feature-space")
    if not sig or not fs:
        return ""
    ad = summary["attacks"].get("feature-space-adaptive") or {}
    rows = [("linear probe on the clients' true emotion-conditional means", f"{sig['probe_true']:.3f}"),
            ("the same probe on the statistics the inversion recovered", f"{sig['probe_recovered']:.3f}"),
            ("the probe on true means, genders shuffled across speakers (chance)", f"{sig['probe_true_shuffled']:.3f}"),
            ("feature-space attack, classifier trained on the attacker's data (ASR, AUC)",
             f"{fs['asr']:.3f} [{fs['asr_ci'][0]:.3f}, {fs['asr_ci'][1]:.3f}], AUC {_num(fs.get('auc'))}")]
    if ad:
        rows.append(("the same, threshold from the attacked clients' score clusters (ASR)",
                     f"{ad['asr']:.3f} [{ad['asr_ci'][0]:.3f}, {ad['asr_ci'][1]:.3f}]"))
    return (f"\n## Where the signal is\n\nProbes cross-validated over the {sig['clients']} attacked clients "
            f"({sig['speakers']} speakers, each in one fold only; balanced accuracy), beside the attack:\n\n"
            "| stage | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows))


def write_grid_report(grid_dir: Path, summaries: list[dict]) -> None:
    """``grid.csv``, ``grid_report.md``, ``grid_asr.png`` and ``grid_roc.png`` over a multirun."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid_dir / "grid.csv", _csv([r for s in summaries for r in _fold_rows(s)]))
    atomic_write_text(grid_dir / "grid_report.md", "# fed-ser grid report\n\n![ASR](grid_asr.png)\n\n"
                      "![ROC](grid_roc.png)\n\n" + _tables(summaries))
    _figure(grid_dir / "grid_asr.png", summaries)
    _roc_figure(grid_dir / "grid_roc.png", summaries)


def _defence_rows(summaries: list[dict]) -> list[dict]:
    rows = []
    for s in summaries:
        d, cnn, profile = s["defence"], s["attacks"]["cnn"], s["attacks"].get("profile") or {}
        fs = s["attacks"].get("feature-space") or {}
        dp = d["dp_mode"] != "none"
        rows.append({"private": s["private_corpus"], "algorithm": s["algorithm"], "dp_mode": d["dp_mode"],
                     "epsilon": d["dp_epsilon"] if dp else None, "clip": d.get("dp_clip") if dp else None,
                     "spent_epsilon_max": d.get("spent_epsilon_max"), "dropout": d["dropout"], "ser_uar": s["ser"]["uar"],
                     "asr": cnn["asr"], "asr_ci_low": cnn["asr_ci"][0], "asr_ci_high": cnn["asr_ci"][1],
                     **{f"asr_pool{k}": v for k, v in cnn["asr_pooled"].items() if k != "1"},
                     **{f"profile_asr_pool{k}": v for k, v in profile.get("asr_pooled", {}).items()},
                     "fs_asr": fs.get("asr"), "fs_auc": fs.get("auc")})
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
    head = "| private | algorithm | DP | epsilon (spent) | clip | dropout | SER UAR | CNN ASR | " + " | ".join(
        f"CNN {k[8:]} rounds" for k in pools) + "".join(f" | profile {k[16:]} round{'s' * (k[16:] != '1')}"
                                                         for k in profile) + " | feature-space ASR (AUC) |"
    lines = ["# Defences: DP and dropout", "", "Attacks on the first layer (dense1) updates, from one round and "
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
                  "| private | algorithm | dropout | SER UAR | CNN ASR | feature-space ASR (AUC) |", "|---|---|---|---|---|---|"]
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
            row.update({f"{col}_asr": m["asr"], f"{col}_lo": m["asr_ci"][0], f"{col}_hi": m["asr_ci"][1],
                        f"{col}_auc": m["auc"], f"{col}_tpr1": m.get("tpr_at_fpr", {}).get("0.01")})
    return row


def write_threat_report(out: Path, cells: dict[str, dict], title: str) -> None:
    """The threat-model matrix: ``matrix.md``, ``matrix.csv``, ``matrix.json`` rows and ``asr_vs_epsilon.png``."""
    rows = [_threat_row(name, s) for name, s in cells.items()]

    def cell(r: dict, col: str) -> str:
        if f"{col}_asr" not in r:
            return "n/a"
        tpr = r.get(f"{col}_tpr1")
        return (f"{100 * r[f'{col}_asr']:.1f} [{100 * r[f'{col}_lo']:.0f}, {100 * r[f'{col}_hi']:.0f}], AUC {_num(r[f'{col}_auc'])}"
                + ("" if tpr is None else f", {100 * tpr:.0f}%"))

    lines = [f"# Threat-model matrix: {title}", "",
             "Rows: defences. Observers: the server (the paper's attacker: every update as received) and an observer of the "
             "round sums only (what SecAgg+ reveals to the server, and what the global models reveal to anyone; central DP "
             "noise included). Cells: ASR % [95% CI], ROC AUC, TPR at 1% FPR. Epsilon: at the run's delta, "
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
            if f"{col}_asr" not in r:
                continue
            eps = r["epsilon_server"] if col.startswith("server") else r["epsilon_aggregate"]
            x = 1e4 if eps is None else eps
            ax.errorbar([x], [100 * r[f"{col}_asr"]], yerr=[[100 * (r[f"{col}_asr"] - r[f"{col}_lo"])], [100 * (r[f"{col}_hi"] - r[f"{col}_asr"])]],
                        fmt=marker, capsize=3, color=colours[r["defence"]], alpha=0.85, label=f"{r['defence']} ({label})")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon against that observer (1e4: no guarantee)")
    ax.set_ylabel("ASR %")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save_png(fig, out / "asr_vs_epsilon.png")
