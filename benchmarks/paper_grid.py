"""The paper-size grid on this machine: each stage's cost measured on a short run, the grid's wall time estimated.

The grid: private corpus (IEMOCAP, CREMA-D, MSP-Improv) x FedSGD / FedAvg x 5 folds at
``size=paper`` (``data.scale=1.0``, 200 rounds, every shadow update, the attack CNN trained for up
to 50 epochs). Per cell and fold, ``fed-ser-experiment`` runs these stages; each is measured here
on fold 1 of the paper-size data and scaled by what the full stage does:

* prepare: synthesis and Emo-Base extraction of every corpus (once: cached on disk), then each
  fold's private and shadow data sets (measured as the time to prepare fold 1 from cached features);
* private: the private federation on Flower: Ray start + 200 rounds at the seconds per round of
  ``--rounds`` measured rounds (20 by default: one round in 20 evaluates every client, as in the
  full run);
* shadow: the shadow federation on the vectorised engine with recording, 200 rounds at the
  measured seconds per round;
* attack: the CNN, one epoch over ``--attack-updates`` shadow updates timed; the full stage is
  (all shadow updates) x epochs x that cost per update-epoch, with 50 epochs (the bound) and with
  the 12 epochs of the README's synthetic grid (``--typical-epochs``);
* invert: the feature-space attack's inversion of every private update (FedSGD gradients, and FedAvg
  pseudo-gradients as one local epoch), at the measured seconds per update of ``--inversions`` of them
  drawn evenly from a 200-round private run on the vectorised engine (later rounds cost more).

The shadow federation and the attack run once per cell, not once per fold: the folds share them
(``shadow.per_fold=false``, the default; ``shadow.per_fold=true`` estimates one of each per fold).

Prints the stage x cell table, the total against the 2-hour target, and the stage that stands in
the way. ``--timed-fold CORPUS ALGORITHM`` then runs that cell's fold 0 at paper size through
``fed-ser-experiment`` and prints the estimate beside the measured time (target: within 25%), stage
by stage, at the typical epochs and at the epochs its attack trained before early stopping.

    python benchmarks/paper_grid.py [--rounds 20] [--attack-updates 300] [--timed-fold iemocap fedsgd]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, parser, report
from omegaconf import OmegaConf

from attacks.inference.data import labelled_updates
from attacks.inference.train import train_attack
from fed_ser.core.schedule import clients_per_round
from fed_ser.data.federated import FederatedData
from fed_ser.data.synthetic import PAPER_CORPORA
from fed_ser.experiments.attack import attack_config, recover_batches, shadow_fold, threat_model
from fed_ser.experiments.cli import run_fl, run_vectorized_fl, seconds_per_round
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import corpus_source, prepare
from fed_ser.recording.store import UpdateStore

FOLDS, ROUNDS, MAX_EPOCHS = 5, 200, 50


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def measure_cell(overrides: list[str], private: str, algorithm: str, rounds: int, attack_updates: int, inversions: int,
                 tmp: Path, serial_reference: bool = False) -> dict:
    """Seconds of each stage of one fold of the cell (private, algorithm), from short runs on fold 1
    (fold 0's data sets were prepared with the corpora, so fold 1 shows a fold's own preparation)."""
    cfg = load_config(["size=paper", f"private={private}", f"fl={algorithm}", f"fl.rounds={rounds}",
                       f"fl.eval_every={rounds}", *overrides], "experiment")
    (tm, t_prep) = _timed(threat_model, cfg, 1)  # the private and shadow data sets, as fed-ser-experiment prepares them
    priv_path, shadow_path = tm.private_data, tm.shadow_data
    n_priv, n_shadow = FederatedData.load(priv_path).num_clients, FederatedData.load(shadow_path).num_clients
    frac = float(cfg.fl.fraction)
    out = {"private_clients": n_priv, "shadow_clients": n_shadow,
           "private_updates": ROUNDS * clients_per_round(n_priv, frac), "shadow_updates": ROUNDS * clients_per_round(n_shadow, frac),
           "prepare_fold_s": t_prep}
    d = tmp / f"{private}-{algorithm}"
    (res, t_total) = _timed(run_fl, cfg, priv_path, str(d / "private"), str(d / "private" / "updates"))
    out["private_round_s"] = seconds_per_round(res)  # the rounds' own time: the nodes' discovery is a start-up cost
    out["private_start_s"] = t_total - rounds * out["private_round_s"]
    (_, t_shadow) = _timed(run_vectorized_fl, cfg, shadow_path, str(d / "shadow"), str(d / "shadow" / "updates"))
    out["shadow_round_s"] = t_shadow / rounds
    store = UpdateStore(d / "shadow" / "updates")
    su, sl = labelled_updates(store, FederatedData.load(shadow_path).client_gender)
    n = min(attack_updates, len(su))
    acfg = attack_config(cfg)
    acfg = acfg.__class__(**{**acfg.__dict__, "max_epochs": 1, "max_updates": n})
    (_, t_attack) = _timed(train_attack, store, su, sl, acfg, progress=False)
    out["attack_update_epoch_s"] = t_attack / n
    out["invert_update_s"] = 0.0
    if cfg.attack.feature_space.enabled:  # fed-ser-experiment inverts every private update, FedAvg's too
        # an update's inversion costs more as the model trains (round 1's batches are found in ~0.1 s,
        # the last rounds' take ~1 s of RANSAC): the private run's updates over all 200 rounds, from the
        # vectorised engine (the same updates for one seed, in seconds), sampled evenly
        full = load_config(["size=paper", f"private={private}", f"fl={algorithm}", f"fl.eval_every={ROUNDS}", *overrides],
                           "experiment")
        (_, out["private_vectorised_s"]) = _timed(run_vectorized_fl, full, priv_path, str(d / "inversion"),
                                                  str(d / "inversion" / "updates"))  # also: private_engine=vectorised
        pstore = UpdateStore(d / "inversion" / "updates")
        every = pstore.updates()
        pu = [every[i] for i in np.linspace(0, len(every) - 1, min(inversions, len(every))).round().astype(int)]
        (rec, t_inv) = _timed(recover_batches, full, pstore, pu, 0)
        out["invert_update_s"] = t_inv / len(pu)
        if serial_reference:  # the same updates on one process: what the workers save
            one = OmegaConf.merge(full, {"attack": {"feature_space": {"workers": 1}}})
            (rec1, t1) = _timed(recover_batches, one, pstore, pu, 0)
            out["invert_serial_update_s"] = t1 / len(pu)
            out["invert_same"] = all(np.array_equal(a.inputs, b.inputs) for a, b in zip(rec, rec1))
        shutil.rmtree(d / "inversion")  # ~1.8 GB a cell
    return out


#: The stages as a fold of ``fed-ser-experiment`` reports them in its results.json: its data sets and
#: its private and shadow federations as one figure (``seconds.fl``), the inversion, and the rest.
FOLD_STAGES = {"prepare + private + shadow": ("prepare", "private", "shadow"), "invert": ("invert",), "attack": ("attack",)}


def fold_stages(result: dict) -> dict[str, float]:
    """What one fold of ``fed-ser-experiment`` spent, by :data:`FOLD_STAGES`, from its results.json."""
    sec, inv = result["seconds"], (result.get("inversion") or {}).get("seconds", 0.0)
    return dict(zip(FOLD_STAGES, (sec["fl"], inv, sec["total"] - sec["fl"] - inv)))


def stage_seconds(m: dict, epochs: float) -> dict[str, float]:
    """One fold of a cell at paper size, stage by stage."""
    return {"prepare": m["prepare_fold_s"], "private": m["private_start_s"] + ROUNDS * m["private_round_s"],
            "shadow": ROUNDS * m["shadow_round_s"], "attack": m["shadow_updates"] * epochs * m["attack_update_epoch_s"],
            "invert": m["private_updates"] * m["invert_update_s"]}


def time_fold(args, cells: dict, numbers: dict, rows: list) -> None:
    """Run fold 0 of ``--timed-fold``'s cell for real and set its time beside the estimate (in ``numbers`` and ``rows``)."""
    corpus, algorithm = args.timed_fold
    m = cells[f"{corpus}/{algorithm}"]
    predicted = sum(stage_seconds(m, args.typical_epochs).values())
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fed_ser.experiments.attack", "size=paper", f"private={corpus}",
                        f"fl={algorithm}", "folds=[0]", f"out_dir={tmp}/cell", f"grid_dir={tmp}", *args.overrides], check=True)
        measured = time.perf_counter() - t
        fold = json.loads((Path(tmp) / "cell" / "results.json").read_text())["folds"][0]
    # the fold's attack stopped early after some epochs: the estimate at those epochs checks the
    # per-stage costs; the one at the typical epochs checks the grid's figure as printed above
    epochs = len(fold["attack_fits"]["cnn"]["history"])  # results schema 2: what the CNN's fit produced
    est = stage_seconds(m, epochs)
    est_stages = {name: sum(est[st] for st in parts) for name, parts in FOLD_STAGES.items()}
    got = fold_stages(fold)
    at_epochs = sum(est.values())
    numbers["timed_fold"] = {"cell": f"{corpus}/{algorithm}", "estimate_s": predicted, "measured_s": measured,
                             "attack_epochs": epochs, "estimate_at_epochs_s": at_epochs,
                             "stages_measured_s": got, "stages_estimated_s": est_stages}
    rows.append((f"timed fold 0 of {corpus}/{algorithm}", f"measured {measured / 60:.1f} min, estimated "
                                                           f"{predicted / 60:.1f} min at {args.typical_epochs:g} epochs "
                                                           f"({measured / predicted - 1:+.0%}; target within 25%)"))
    rows.append((f"  at the {epochs} epochs it trained", f"estimated {at_epochs / 60:.1f} min ({measured / at_epochs - 1:+.0%}); "
                 + ", ".join(f"{st} {got[st]:.0f} s vs {est_stages[st]:.0f} s" for st in got)))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=20,
                   help="rounds measured per federation (20 = fl.eval_every: one client evaluation, as in every 20 of the 200)")
    p.add_argument("--attack-updates", type=int, default=300)
    p.add_argument("--inversions", type=int, default=40, help="private updates inverted per cell to time the inversion")
    p.add_argument("--typical-epochs", type=float, default=12.0,
                   help="attack epochs for the second estimate (12: the README's synthetic grid; 50 is the bound)")
    p.add_argument("--corpora", nargs="+", default=list(PAPER_CORPORA))
    p.add_argument("--timed-fold", nargs=2, metavar=("CORPUS", "ALGORITHM"))
    args = p.parse_args()
    base = load_config(["size=paper", *args.overrides], "experiment")
    (ROOT / "runs").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    # the one-time cost: synthesis and extraction of every corpus at paper size (cached afterwards)
    (_, t_corpora) = _timed(lambda: [prepare(base, [corpus_source(base, c)], 0) for c in PAPER_CORPORA])
    cells = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        for private in args.corpora:
            for algorithm in ("fedsgd", "fedavg"):
                print(f"[paper-grid] measuring {private} {algorithm}", flush=True)
                cells[f"{private}/{algorithm}"] = measure_cell(args.overrides, private, algorithm, args.rounds, args.attack_updates,
                                                             args.inversions, Path(tmp),
                                                             serial_reference=not cells and algorithm == "fedsgd")
    stages = ("prepare", "private", "shadow", "attack", "invert")
    # how many times a cell runs each stage: the folds share one shadow federation and attack (shadow_fold)
    shared = shadow_fold(base, 1) == 0
    runs = {st: 1 if shared and st in ("shadow", "attack") else FOLDS for st in stages}
    est = {epochs: {c: stage_seconds(m, epochs) for c, m in cells.items()} for epochs in (MAX_EPOCHS, args.typical_epochs)}
    by_stage = {e: {st: runs[st] * sum(s[st] for s in by_cell.values()) for st in stages} for e, by_cell in est.items()}
    totals = {e: t_corpora + sum(v.values()) for e, v in by_stage.items()}
    rows = [("one-time synthesis + extraction", f"{t_corpora / 60:.1f} min (cached after the first run)"),
            ("runs per cell", ", ".join(f"{st} x{n}" for st, n in runs.items()) + " (shadow.per_fold="
             f"{str(bool(base.shadow.per_fold)).lower()})")]
    for c, s in est[args.typical_epochs].items():
        m = cells[c]
        rows.append((c, " ".join(f"{st} {s[st]:.0f}s" for st in stages)
                     + f"  ({m['private_clients']} private / {m['shadow_clients']} shadow clients; "
                       f"{m['private_round_s'] * 1000:.0f} ms a Flower round, {m['attack_update_epoch_s'] * 1000:.1f} ms an update-epoch)"))
    for c, m in cells.items():
        if "invert_serial_update_s" in m:
            rows.append((f"inversion, {c}", f"{m['invert_serial_update_s']:.2f} s an update on one process, "
                         f"{m['invert_update_s']:.2f} s on the workers ({m['invert_serial_update_s'] / m['invert_update_s']:.2f}x; "
                         f"same batches recovered: {m['invert_same']})"))
    for e in (args.typical_epochs, MAX_EPOCHS):
        worst = max(by_stage[e], key=by_stage[e].get)
        rows.append((f"grid, attack {e:g} epochs", f"{totals[e] / 3600:.2f} h  (target <= 2 h); largest stage: {worst} "
                                                   f"{by_stage[e][worst] / 3600:.2f} h"))
    # the same grid configured lighter: without fed-ser's feature-space attack (the paper's attacks only:
    # attack.feature_space.enabled=false), and with the private runs on the vectorised engine as well
    # (private_engine=vectorised: the same rounds without Flower's message path)
    vec = [m["private_vectorised_s"] for m in cells.values() if "private_vectorised_s" in m]
    lighter: dict[str, dict[str, float]] = {}
    for e in (args.typical_epochs, MAX_EPOCHS):
        paper_only = totals[e] - by_stage[e]["invert"]
        line = f"{paper_only / 3600:.2f} h without the feature-space attack"
        if len(vec) == len(cells):
            light = paper_only - by_stage[e]["private"] + FOLDS * sum(vec)
            line += f"; {light / 3600:.2f} h with private_engine=vectorised too"
            lighter[str(e)] = {"paper_attacks": paper_only, "paper_attacks_vectorised": light}
        rows.append((f"  lighter, {e:g} epochs", line))
    numbers = {"cells": cells, "corpora_s": t_corpora, "runs_per_cell": runs, "estimate_s": {str(e): t for e, t in totals.items()},
               "lighter_s": lighter,
               "by_stage_s": {str(e): v for e, v in by_stage.items()}, "measure_s": time.perf_counter() - t0}
    if args.timed_fold:
        time_fold(args, cells, numbers, rows)
    report("Paper-size grid (3 corpora x FedSGD/FedAvg x 5 folds, 200 rounds)", rows, args.json, numbers)


if __name__ == "__main__":
    main()
