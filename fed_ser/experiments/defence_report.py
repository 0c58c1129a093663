"""Readable results of the defence sweep (``fed-ser-defense``), the threat-model matrix (``fed-ser-threats``)
and the robustness experiment (``fed-ser-robust``): CSV, Markdown tables and PNG figures. Attack figures
are balanced accuracies with their intervals over speakers (:mod:`fed_ser.experiments.report` for the
statistics note)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fed_ser.experiments.report import ci_pp, csv_text, num, pct, pp, pyplot, save_png
from fed_ser.io import atomic_write_text


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
    return f"{pct(r['fs_asr'])} ({num(r.get('fs_auc'))})"


def _pool_label(key: str) -> str:
    if key.startswith("profile_asr_pool"):
        k = key[16:]
        return f"profile, {k} round{'s' * (k != '1')}"
    return f"CNN, {key[8:]} rounds"


def _defence_figure(path: Path, rows: list[dict]) -> None:
    """UAR vs epsilon (one line per defence group) and, one panel per group, each attack's ASR vs
    epsilon; dotted lines: the same private corpus and algorithm without DP."""
    plt = pyplot()

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
    save_png(fig, path, rect=(0, 0.08, 1, 1))


def write_defense_report(grid_dir: Path, summaries: list[dict]) -> None:
    """``defense.csv``, ``defense_report.md`` (epsilon table; dropout table like the paper's Table VI)
    and ``defense.png`` (UAR and ASR vs epsilon)."""
    rows = _defence_rows(summaries)
    grid_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid_dir / "defense.csv", csv_text(rows))
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
                     f"{pct(r['ser_uar'])} | {pct(r['asr'])} | " + "".join(f"{pct(r.get(k))} | " for k in pools + profile)
                     + f"{_fs_cell(r)} |")
    nodp = [r for r in rows if r["dp_mode"] == "none"]
    if len({r["dropout"] for r in nodp}) > 1:
        lines += ["", "## Dropout (shaped like the paper's Table VI)", "",
                  "| private | algorithm | dropout | SER UAR | CNN balanced | feature-space balanced (AUC) |", "|---|---|---|---|---|---|"]
        for r in sorted(nodp, key=lambda r: (r["private"], r["algorithm"], r["dropout"])):
            lines.append(f"| {r['private']} | {r['algorithm']} | {r['dropout']:g} | {pct(r['ser_uar'])} | {pct(r['asr'])} | "
                         f"{_fs_cell(r)} |")
    lines += ["", "![UAR and ASR vs epsilon](defense.png)", ""]
    atomic_write_text(grid_dir / "defense_report.md", "\n".join(lines))
    if any(r["epsilon"] is not None for r in rows):
        _defence_figure(grid_dir / "defense.png", rows)


def _robust_figure(path: Path, rows: list[dict]) -> None:
    plt = pyplot()

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
    save_png(fig, path)


def write_robust_report(out: Path, result: dict) -> None:
    """``robust.csv``, ``robust_report.md`` (robust UAR per model, attack and epsilon) and ``robust.png``."""
    rows = result["rows"]
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else -1)
    atomic_write_text(out / "robust.csv", csv_text([{k: r.get(k) for k in fields} for r in rows]))
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
        lines.append(f"| {model} | {attack} | {pct(clean)} | "
                     + " | ".join(pct(by_eps[e]["robust_uar"]) if e in by_eps else "-" for e in epsilons) + " |")
    rr = [r for r in rows if "adaptive_uar" in r]
    if rr:
        lines += ["", "Randomised model, adaptive (EOT) vs static attack:", "",
                  "| attack | epsilon | adaptive UAR | static UAR |", "|---|---|---|---|"]
        lines += [f"| {r['attack']} | {r['epsilon']:g} | {pct(r['adaptive_uar'])} | {pct(r['static_uar'])} |" for r in rr]
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
                        ("profile", "server_profile"), ("round-matched", "server_rm"), ("aggregate-observer", "aggregate")):
        m = a.get(attack)
        if m is not None:
            row.update({f"{col}_asr": m["balanced"], f"{col}_lo": m["balanced_ci"][0], f"{col}_hi": m["balanced_ci"][1],
                        f"{col}_paper_asr": m["asr"], f"{col}_speakers": m["speakers"], f"{col}_p": m.get("p_value"),
                        f"{col}_constant": m.get("constant", False),
                        f"{col}_auc": m["auc"], f"{col}_tpr1": m.get("tpr_at_fpr", {}).get("0.01")})
    return row


def write_threat_report(out: Path, cells: dict[str, dict], title: str) -> None:
    """The threat-model matrix: ``matrix.md``, ``matrix.csv``, ``matrix.json`` rows and ``asr_vs_epsilon.png``."""
    rows = [_threat_row(name, s) for name, s in cells.items()]
    rm = any("server_rm_asr" in r for r in rows)  # FedAvg rows: the round-matched attack has its column

    def cell(r: dict, col: str) -> str:
        if f"{col}_asr" not in r:
            return "n/a"
        if r.get(f"{col}_constant"):
            return "50.0, one score for all clients (nothing read)"
        p = r.get(f"{col}_p")
        return (f"{pp(r[f'{col}_asr'])}{ci_pp([r[f'{col}_lo'], r[f'{col}_hi']])}, AUC {num(r[f'{col}_auc'])}"
                + ("" if p is None else f", p {p:.2f}"))

    lines = [f"# Threat-model matrix: {title}", "",
             "Rows: defences. Observers: the server (the paper's attacker: every update as received) and an observer of the "
             "round sums only (what SecAgg+ reveals to the server, and what the global models reveal to anyone; central DP "
             "noise included). Cells: balanced accuracy % [95% CI over speakers], ROC AUC over one score per client, "
             "permutation p-value of the control. Epsilon: at the run's delta, "
             "max over clients, against that observer (none: no guarantee). SecAgg+ rows: the server sees the round sums "
             "only; its feature-space cell is the differencing attack on the sums it unmasks, before any noise it adds, "
             "and the aggregates column reads the global models.", "",
             "| defence | SER UAR | server: feature-space | server: CNN | server: profile "
             + ("| server: round-matched " if rm else "") + "| aggregates: differencing "
             "| epsilon vs server | epsilon vs aggregates | s/round |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if rm else "")]
    for r in rows:
        lines.append(f"| {r['defence']} | {num(r['ser_uar'], True)} | {cell(r, 'server_fs')} | {cell(r, 'server_cnn')} | "
                     f"{cell(r, 'server_profile')} | " + (f"{cell(r, 'server_rm')} | " if rm else "")
                     + f"{cell(r, 'aggregate')} | {_eps(r['epsilon_server'])} | "
                     f"{_eps(r['epsilon_aggregate'])} | {num(r['seconds_per_round'])} |")
    lines += ["", "What each epsilon guarantees:", ""] + [f"- {r['defence']}: {r['guarantee'] or 'no DP'}" for r in rows]
    atomic_write_text(out / "matrix.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "matrix.csv", csv_text(rows))
    plt = pyplot()
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
    save_png(fig, out / "asr_vs_epsilon.png")
