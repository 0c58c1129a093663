"""Flower simulation vs a bare in-process PyTorch loop doing the same FedSGD arithmetic.

The paper's FedSGD set-up on the CREMA-D-sized synthetic corpus (73 training clients, 10% a
round, batch 20, server lr 0.1; 200 rounds by default). Both runs select the same clients with
the same seeds (fed_ser.core.schedule), so their final test UAR must agree: the ratio compares like
with like. Target: Flower within 3x of the loop.

    python benchmarks/flower_vs_loop.py [fl.rounds=200] [data.scale=0.5]
"""

from __future__ import annotations

import tempfile
import time

from _common import parser, prepared, report

from fed_ser.data.federated import FederatedData
from fed_ser.engines.inprocess import run_inprocess
from fed_ser.experiments.cli import run_fl, run_settings


def main() -> None:
    args = parser(__doc__).parse_args()
    overrides = ["dataset=crema_d", "fl=fedsgd", "fl.rounds=200", *args.overrides]
    cfg, path = prepared(overrides, ["crema_d"])
    cfg.fl.eval_every = int(cfg.fl.rounds)  # evaluate once, at the end, in both
    data = FederatedData.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = run_fl(cfg, path, f"{tmp}/flower")
        flower_total = time.perf_counter() - t
        flower_rounds = res["wall_seconds"]
        s = run_settings(cfg, path, "")
        t = time.perf_counter()
        ref = run_inprocess(data, s)
        loop = time.perf_counter() - t
    rounds = int(cfg.fl.rounds)
    numbers = {"clients": data.num_clients, "rounds": rounds, "flower_total_s": flower_total,
               "flower_rounds_s": flower_rounds, "loop_s": loop, "ratio_rounds": flower_rounds / loop,
               "ratio_total": flower_total / loop, "uar_flower": res["final"]["test_uar"], "uar_loop": ref["uar"]}
    report("Flower simulation vs in-process loop (FedSGD)", [
        ("clients / rounds", f"{data.num_clients} / {rounds} ({max(int(0.1 * data.num_clients), 1)} a round)"),
        ("in-process loop", f"{loop:.1f} s ({1000 * loop / rounds:.1f} ms/round)"),
        ("Flower, rounds only", f"{flower_rounds:.1f} s ({1000 * flower_rounds / rounds:.1f} ms/round)"),
        ("Flower, incl. Ray start", f"{flower_total:.1f} s"),
        ("ratio (rounds only)", f"{flower_rounds / loop:.2f}x  (target <= 3x)"),
        ("ratio (incl. start)", f"{flower_total / loop:.2f}x"),
        ("final test UAR", f"Flower {res['final']['test_uar']:.4f} / loop {ref['uar']:.4f} (same clients and seeds)"),
    ], args.json, numbers)


if __name__ == "__main__":
    main()
