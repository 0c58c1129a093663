"""FedAvg attacks on recorded runs (issue 35): where reading gender from multi-step updates works and where it stops.

For each recorded experiment cell (``runs/experiment/<cell>``, made by ``fed-ser-experiment ... fl=fedavg``
with the feature-space attack off), per fold: the private run's store and prepared data, and the
attacker's prepared data (``shadow.mode=speakers``: half of each fold's training speakers), as
``fed_ser/experiments/attack.py`` finds them. Two attacks, each using only what the server sees (the
recorded global models, each update, its ``num_examples``, the local settings):

* ``round-matched``: :class:`attacks.inference.round_matched.RoundMatchedAttack`, simulated updates of
  virtual clients from the attacker's speakers at each attacked round and size;
* ``inversion``: :func:`attacks.inference.unrolled.invert_fedavg` on up to ``--invert`` updates per
  client, what is recovered fed to the feature-space classifier
  (:func:`attacks.inference.feature_space.train_feature_space_attack`, trained on the attacker's speakers).

Printed per setting: balanced accuracy over the attacked clients (one score per client: its updates
pooled; and k=1, single updates) with a speaker-level bootstrap interval (speakers resampled within each
gender, each speaker's clients and folds together), the majority baseline, AUC on one score per client,
the control (the same attack fitted on the attacker's speakers relabelled: every balanced relabelling but
the identity and its inverse, one per fold's attacker, combined over the folds) with its permutation p-value, the seconds per attacked update, the
inversion's recovery (share of the clients' utterances recovered within 10% / 25% relative error of a
true one, and their labels), and the stage probes (a linear probe cross-validated over the attacked
clients, speakers grouped: their true emotion-conditional means, the means of what was recovered, the
round-matched summaries): where the signal is kept or lost. Ground truth (the private clients' genders,
speakers, rows) is joined only after scoring.

    flock /tmp/fedser-heavy.lock .venv/bin/python benchmarks/fedavg_attack.py runs/experiment/emodb-fedavg-speakers-adam-e1-s4 ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from attacks.inference.feature_space import emotion_means, pooled, train_feature_space_attack
from attacks.inference.round_matched import AttackerSpeakers, RoundMatchedAttack
from attacks.inference.simulate import LocalSettings
from attacks.inference.unrolled import SIGN_MAGNITUDE, invert_fedavg, reads_magnitude
from fed_ser.data.federated import TRAIN, FederatedData
from fed_ser.experiments.calibration import probe
from fed_ser.recording.store import UpdateStore


def speaker_keys(data: FederatedData) -> np.ndarray:
    return np.char.add(np.char.add(data.client_corpus.astype(str), "/"), data.client_speaker.astype(str))


def fold_inputs(cell: Path, fold: int) -> tuple[UpdateStore, FederatedData, FederatedData, dict]:
    """The private run's store and data, the attacker's data and the run settings of one fold."""
    d = cell / f"fold{fold}"
    priv = next(p for p in sorted(d.glob("private-*")) if (p / "results.json").exists())
    # shadow.mode=corpora/synthetic (shadow.per_fold=false): one shadow federation, in fold 0's folder
    shadow = next(p for p in [*sorted(d.glob("shadow-*")), *sorted((cell / "fold0").glob("shadow-*"))] if (p / "results.json").exists())
    rp, rs = json.loads((priv / "results.json").read_text()), json.loads((shadow / "results.json").read_text())
    return (UpdateStore(priv / "updates"), FederatedData.load(rp["settings"]["data.prepared"]),
            FederatedData.load(rs["settings"]["data.prepared"]), {**rp["settings"], "ser_uar": rp["final"]["test_uar"]})


def relabellings(speakers: list[str], female: dict, limit: int, seed: int = 0) -> list[dict]:
    """Labellings of ``speakers`` with as many women as ``female`` has, but the true one and its inverse: every
    one where there are at most ``limit``, else ``limit`` distinct ones drawn at random."""
    k = sum(female[s] for s in speakers)
    truth = frozenset(s for s in speakers if female[s])
    inverse = frozenset(s for s in speakers if not female[s])
    if math.comb(len(speakers), k) - 2 <= limit:
        sets = [frozenset(w) for w in itertools.combinations(speakers, k)]
    else:
        rng, seen = np.random.default_rng(seed), set()
        while len(seen) < limit:
            seen.add(frozenset(rng.choice(speakers, k, replace=False).tolist()))
        sets = sorted(seen, key=sorted)
    return [{s: s in women for s in speakers} for women in sets if women not in (truth, inverse)][:limit]


def balanced(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    return float(np.mean([np.mean((scores[labels == g] > threshold) == g) for g in (0, 1) if (labels == g).any()]))


def speaker_interval(correct: np.ndarray, labels: np.ndarray, speakers: np.ndarray, n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the balanced accuracy, speakers resampled within each gender (a speaker's
    clients, in every fold, together); Clopper-Pearson over speakers where every speaker is all right or all wrong."""
    rng = np.random.default_rng(seed)
    by = {g: [np.flatnonzero(speakers == s) for s in np.unique(speakers[labels == g])] for g in (0, 1)}
    per_spk = [correct[i].mean() for g in (0, 1) for i in by[g]]
    if all(v in (0.0, 1.0) for v in per_spk) and len(set(per_spk)) == 1:
        from scipy.stats import binomtest

        ci = binomtest(int(sum(per_spk)), len(per_spk)).proportion_ci()
        return float(ci.low), float(ci.high)
    stats = []
    for _ in range(n_boot):
        recall = []
        for g in (0, 1):
            if not by[g]:
                continue
            pick = rng.integers(0, len(by[g]), len(by[g]))
            recall.append(np.concatenate([correct[by[g][i]] for i in pick]).mean())
        stats.append(np.mean(recall))
    return float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def control_runs(controls: dict, keys: list, most: int = 999, seed: int = 0) -> list[dict]:
    """The control's relabellings of every fold combined: each fold's attacker is relabelled on its own (its
    relabellings, :func:`relabellings`), so a run of the pooled control picks one relabelling per fold; all
    combinations, or ``most`` drawn at random."""
    folds = sorted(controls)
    if not folds or any(not controls[f] for f in folds):
        return []
    sizes = [len(controls[f]) for f in folds]
    total = int(np.prod(sizes))
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(*[range(n) for n in sizes])) if total <= most else \
        [tuple(int(rng.integers(n)) for n in sizes) for _ in range(most)]
    out = []
    for combo in combos:
        run = {}
        for f, i in zip(folds, combo):
            run.update(controls[f][i])
        out.append(run)
    return out


def summarise(name: str, per_client: dict, controls: dict, k1: dict | None, seconds: float, updates: int) -> dict:
    """Metrics of one attack over the attacked clients of every fold (``per_client[key] = (score, label, speaker)``;
    ``controls[fold][i]``: the scores of that fold's clients under its attacker's i-th relabelling)."""
    keys = sorted(per_client)
    s = np.array([per_client[k][0] for k in keys])
    y = np.array([per_client[k][1] for k in keys])
    spk = np.array([per_client[k][2] for k in keys])
    bal = balanced(s, y)
    lo, hi = speaker_interval(((s > 0.5) == y).astype(float), y, spk)
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None
    ctl = [balanced(np.array([c[k] for k in keys]), y) for c in control_runs(controls, keys)]
    out = {"attack": name, "balanced": bal, "ci": [lo, hi], "auc": auc, "clients": len(keys), "speakers": len(np.unique(spk)),
           "women": int(y.sum()), "majority": float(max(y.mean(), 1 - y.mean())), "control": float(np.mean(ctl)) if ctl else None,
           "control_runs": len(ctl), "p": float((1 + sum(c >= bal for c in ctl)) / (1 + len(ctl))) if ctl else None,
           "seconds_per_update": seconds / max(updates, 1),
           "per_client": [[int(k[0]), int(k[1]), str(sp), int(lab), float(sc)] for k, sp, lab, sc in zip(keys, spk, y, s)],
           "controls": {str(f): [[float(c[k]) for k in sorted(c)] for c in runs] for f, runs in controls.items()}}
    if k1 is not None:
        c1 = np.array([k1[k] for k in keys])
        out["k1_balanced"] = float(np.mean([c1[y == g].mean() for g in (0, 1)]))
    return out


def run_cell(cell: Path, folds: list[int], per_update: int, invert: int, n_controls: int, attacks: list[str]) -> dict:
    rm_client, rm_k1, rm_controls, inv_client, inv_controls = {}, {}, {}, {}, {}
    rm_seconds = inv_seconds = 0.0
    rm_updates = inv_updates = 0
    # utterances in the inverted updates, returned, within 10%, within 25%, labels right (of 25%), sign pattern >= 95%,
    # labels right (of the sign-recovered)
    recovery = np.zeros(7)
    signal = {"true": [], "true_signs": [], "recovered": [], "summary": [], "label": [], "speaker": []}
    settings_row = None
    ser: list[float] = []
    for fold in folds:
        store, priv, att, st = fold_inputs(cell, fold)
        settings = LocalSettings(algorithm=st["fl.algorithm"], local_epochs=int(st["fl.local_epochs"]),
                                 batch_size=int(st["fl.batch_size"]), optimizer=st["fl.optimizer"], lr=float(st["fl.lr"]),
                                 dropout=float(st["model.dropout"]))
        ups = store.updates()
        sizes = np.array([u.num_examples for u in ups])
        ser.append(st["ser_uar"])
        settings_row = {**settings.__dict__, "client_size": float(sizes.mean()), "steps": float(np.mean([u.steps for u in ups])),
                        "ser_uar": float(np.mean(ser))}
        rows = att.client >= 0
        akeys = speaker_keys(att)
        female = {str(s): g == "F" for s, g in zip(akeys, att.client_gender)}
        attacker = AttackerSpeakers(att.X[rows], att.y[rows], akeys[att.client[rows]], female)
        perms = relabellings(attacker.speakers, attacker.female, n_controls)
        # ground truth, joined after scoring
        pkeys = speaker_keys(priv)
        truth = {c: (int(priv.client_gender[c] == "F"), str(pkeys[c])) for c in np.unique([u.client for u in ups])}
        clients = np.array([u.client for u in ups])
        if "round-matched" in attacks:
            t0 = time.perf_counter()
            rm = RoundMatchedAttack(settings, per_update=per_update, seed=fold)
            rm.fit_store(attacker, store, ups)
            Z = rm.summaries(store, ups)
            p_up = rm.p_female(Z)
            rm_seconds += time.perf_counter() - t0
            rm_updates += len(ups)
            for c in truth:
                idx = np.flatnonzero(clients == c)
                rm_client[(fold, c)] = (float(rm.p_female(Z[idx].mean(0))[0]), *truth[c])
                rm_k1[(fold, c)] = float(np.mean((p_up[idx] > 0.5) == truth[c][0]))
            chosen = dict(rm.chosen)
            rm_controls[fold] = []
            for fem in perms:
                rm.fit_classifier(fem)
                rm_controls[fold].append({(fold, c): float(rm.p_female(Z[np.flatnonzero(clients == c)].mean(0))[0]) for c in truth})
            print(f"  fold {fold}: round-matched chose {chosen}", flush=True)
        if "inversion" in attacks:
            t0 = time.perf_counter()
            picked = [u for c in truth for u in [v for v in ups if v.client == c][:invert]]
            recs = []
            for u in picked:
                rec = invert_fedavg(store.read(u), store.read(store.global_record(u.round)), u.num_examples, settings)
                recs.append(rec)
            # the classifier reads what the inversion can recover: the rows' values, or (several Adam steps) their signs
            signs_only = not reads_magnitude(settings, int(np.median(sizes)))
            Xa = SIGN_MAGNITUDE * np.sign(att.X[rows]) if signs_only else att.X[rows]
            fs_kwargs = dict(batch_size=10**6, pools=[1], speaker=akeys[att.client[rows]], sizes=sizes, draws_from="speakers")
            fs = train_feature_space_attack(Xa, att.y[rows], att.client[rows], att.client_gender, **fs_kwargs)
            by_client = {c: [r for u, r in zip(picked, recs) if u.client == c] for c in truth}
            for c in truth:
                inv_client[(fold, c)] = (fs.p_female(*pooled(by_client[c])), *truth[c])
            inv_seconds += time.perf_counter() - t0
            inv_updates += len(picked)
            inv_controls[fold] = []
            for i, fem in enumerate(perms):
                gender = np.array(["F" if fem[str(k)] else "M" for k in akeys])
                ctl = train_feature_space_attack(Xa, att.y[rows], att.client[rows], gender, seed=i + 1, **fs_kwargs)
                inv_controls[fold].append({(fold, c): ctl.p_female(*pooled(by_client[c])) for c in truth})
            for u, rec in zip(picked, recs):  # recovery against the truth
                X, y = priv.client_rows(u.client, TRAIN)
                recovery[0] += len(X)
                if len(rec.inputs):
                    rel = np.linalg.norm(rec.inputs[:, None] - X[None], axis=2) / np.linalg.norm(X, axis=1)[None]
                    r, j = rel.min(1), rel.argmin(1)
                    agree = (np.sign(rec.inputs) @ np.sign(X).T / X.shape[1]).max(1)
                    ja = (np.sign(rec.inputs) @ np.sign(X).T).argmax(1)
                    recovery[1:] += [len(r), (r < 0.1).sum(), (r < 0.25).sum(), ((rec.labels == y[j]) & (r < 0.25)).sum(),
                                     (agree >= 0.95).sum(), ((rec.labels == y[ja]) & (agree >= 0.95)).sum()]
            for c in truth:  # stage probes: the clients' true statistics, what was recovered, the update's summary
                X, y = priv.client_rows(c, TRAIN)
                Xr, yr = pooled(by_client[c])
                signal["true"].append(emotion_means(X, y))
                signal["true_signs"].append(emotion_means(SIGN_MAGNITUDE * np.sign(X), y))
                signal["recovered"].append(emotion_means(Xr, yr) if len(Xr) else np.zeros(4 * X.shape[1]))
                signal["summary"].append(Z[np.flatnonzero(clients == c)].mean(0) if "round-matched" in attacks else np.zeros(1))
                signal["label"].append(truth[c][0])
                signal["speaker"].append(truth[c][1])
        print(f"  fold {fold} done ({len(ups)} updates, {len(truth)} clients)", flush=True)
    out = {"cell": cell.name, "settings": settings_row, "results": []}
    if rm_client:
        out["results"].append(summarise("round-matched", rm_client, rm_controls, rm_k1, rm_seconds, rm_updates))
    if inv_client:
        res = summarise("inversion", inv_client, inv_controls, None, inv_seconds, inv_updates)
        res["recovery"] = {"utterances": int(recovery[0]), "returned": int(recovery[1]), "within_10pct": int(recovery[2]),
                           "within_25pct": int(recovery[3]), "labels_right_of_25pct": int(recovery[4]),
                           "sign_95pct": int(recovery[5]), "labels_right_of_sign": int(recovery[6])}
        out["results"].append(res)
        lab, spk = np.array(signal["label"]), np.array(signal["speaker"])
        out["probes"] = {"true_statistics": probe(np.array(signal["true"]), lab, spk),
                         "true_sign_statistics": probe(np.array(signal["true_signs"]), lab, spk),
                         "recovered_statistics": probe(np.array(signal["recovered"]), lab, spk)}
        if "round-matched" in attacks:
            out["probes"]["round_matched_summary"] = probe(np.array(signal["summary"]), lab, spk)
        names = np.unique(spk)  # the probe's chance level: genders shuffled across speakers
        flip = dict(zip(names.tolist(), np.random.default_rng(0).permutation([lab[spk == n][0] for n in names])))
        out["probes"]["true_statistics_shuffled"] = probe(np.array(signal["true"]), np.array([flip[n] for n in spk.tolist()]), spk)
    return out


def fmt(r: dict) -> str:
    ctl = "" if r["control"] is None else f"; control {r['control']:.3f} (p = {r['p']:.3f}, {r['control_runs']} relabellings)"
    k1 = f"; k=1 {r['k1_balanced']:.3f}" if "k1_balanced" in r else ""
    auc = "n/a" if r["auc"] is None else f"{r['auc']:.2f}"
    return (f"{r['attack']:>14}: balanced {r['balanced']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]{k1}, AUC {auc}, "
            f"majority {r['majority']:.3f}, {r['clients']} clients / {r['speakers']} speakers{ctl}; "
            f"{r['seconds_per_update']:.2f} s/update")


def plot(results: list[dict], path: Path) -> None:
    """Balanced accuracy (speaker-level interval) against local epochs, per attack and optimiser, on the cells
    of one client size and corpus (EmoDB, 4 clients a speaker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    rows = [r for r in results if r["cell"].startswith("emodb-fedavg-speakers-") and r["cell"].endswith("-s4")]
    for (attack, opt), style in zip(itertools.product(("round-matched", "inversion"), ("adam", "sgd")), ("o-", "s-", "o--", "s--")):
        pts = sorted((r["settings"]["local_epochs"], a) for r in rows if r["settings"]["optimizer"] == opt
                     for a in r["results"] if a["attack"] == attack)
        if not pts:
            continue
        e = np.array([p[0] for p in pts], dtype=float) + (0.06 if attack == "inversion" else -0.06)
        b = np.array([p[1]["balanced"] for p in pts])
        lo, hi = np.array([p[1]["ci"][0] for p in pts]), np.array([p[1]["ci"][1] for p in pts])
        ax.errorbar(e, b, yerr=[b - lo, hi - b], fmt=style, capsize=3, label=f"{attack}, {opt}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("local epochs (EmoDB, ~7 rows a client)")
    ax.set_ylabel("balanced accuracy over clients")
    ax.set_xticks([1, 2, 5])
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("FedAvg attacks on EmoDB (shadow.mode=speakers, 5 folds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def table(results: list[dict]) -> str:
    """The measured cells as one markdown table (attack x optimiser x local epochs x client size)."""
    lines = ["| cell | optimiser, lr | local epochs | rows a client (steps) | SER UAR | attack | balanced accuracy [95% speaker CI] | "
             "AUC | control (p) | s / update | recovered (within 10% / 25% / sign pattern) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = dict(r["settings"])
        uars = [json.loads(f.read_text())["final"]["test_uar"] for f in sorted(Path("runs/experiment", r["cell"]).glob("fold*/private-*/results.json"))]
        if uars:  # the private runs' SER UAR, mean over the folds
            st["ser_uar"] = float(np.mean(uars))
        for a in r["results"]:
            rec = a.get("recovery")
            recov = "-" if rec is None else (f"{rec['within_10pct'] / rec['utterances']:.0%} / {rec['within_25pct'] / rec['utterances']:.0%} / "
                                             f"{rec['sign_95pct'] / rec['utterances']:.0%} of {rec['utterances']}")
            auc = "n/a" if a["auc"] is None else f"{a['auc']:.2f}"
            ctl = "-" if a["control"] is None else f"{a['control']:.3f} ({a['p']:.3f})"
            lines.append(f"| {r['cell']} | {st['optimizer']}, {st['lr']:g} | {st['local_epochs']} | {st['client_size']:.1f} ({st['steps']:.1f}) | "
                         f"{st['ser_uar']:.3f} | {a['attack']} | {a['balanced']:.3f} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] | {auc} | {ctl} | "
                         f"{a['seconds_per_update']:.2f} | {recov} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cells", nargs="+", type=Path)
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--per-update", type=int, default=32, help="virtual clients simulated per attacked (round, size)")
    ap.add_argument("--invert", type=int, default=2, help="updates inverted per attacked client")
    ap.add_argument("--controls", type=int, default=19, help="relabellings of the attacker's speakers (at most)")
    ap.add_argument("--attacks", default="round-matched,inversion")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="append each cell's results as a JSON line")
    ap.add_argument("--figure", type=Path, default=None,
                    help="with cells given as JSON-lines files written by --out: plot them to this path instead of measuring")
    ap.add_argument("--table", action="store_true", help="with cells given as JSON-lines files: print the markdown table")
    args = ap.parse_args(argv)
    if args.figure is not None or args.table:
        latest: dict[str, dict] = {}  # per cell, the latest measurement of each attack (runs of one attack add up)
        for f in args.cells:
            for line in f.read_text().splitlines():
                r = json.loads(line)
                if not all("per_client" in a for a in r["results"]):  # an earlier format (controls per fold)
                    continue
                cell = latest.setdefault(r["cell"], {"cell": r["cell"], "settings": r["settings"], "results": [], "probes": {}})
                names = {a["attack"] for a in r["results"]}
                cell["results"] = [a for a in cell["results"] if a["attack"] not in names] + r["results"]
                cell["probes"].update(r.get("probes", {}))
        if args.figure is not None:
            plot(list(latest.values()), args.figure)
        if args.table:
            print(table(list(latest.values())))
        return
    torch.set_num_threads(args.threads)
    folds = [int(f) for f in args.folds.split(",")]
    for cell in args.cells:
        if not (cell / "fold0").exists() and not any((cell / f"fold{f}").exists() for f in folds):
            print(f"[fedavg_attack] {cell}: no recorded folds", file=sys.stderr)
            continue
        print(f"== {cell.name}", flush=True)
        res = run_cell(cell, folds, args.per_update, args.invert, args.controls, args.attacks.split(","))
        s = res["settings"]
        print(f"   {s['optimizer']} lr {s['lr']}, {s['local_epochs']} local epochs, batch {s['batch_size']}, "
              f"{s['client_size']:.1f} rows a client ({s['steps']:.1f} steps), SER UAR {s['ser_uar']:.3f} (mean over the folds)")
        for r in res["results"]:
            print("   " + fmt(r))
            if "recovery" in r:
                v = r["recovery"]
                print(f"   {'':>14}  recovered {v['returned']} of {v['utterances']} utterances; within 10%: {v['within_10pct']} "
                      f"({v['within_10pct'] / max(v['utterances'], 1):.1%}), within 25%: {v['within_25pct']} "
                      f"({v['within_25pct'] / max(v['utterances'], 1):.1%}), their emotion right: {v['labels_right_of_25pct']}; "
                      f"sign pattern >= 95% right: {v['sign_95pct']} ({v['sign_95pct'] / max(v['utterances'], 1):.1%}), "
                      f"their emotion right: {v['labels_right_of_sign']}")
        if "probes" in res:
            print("   probes (balanced accuracy, cross-validated over the attacked clients): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in res["probes"].items()))
        if args.out is not None:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
