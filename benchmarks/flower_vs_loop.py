"""Flower simulation vs a bare in-process PyTorch loop doing the same FedSGD arithmetic.

The paper's FedSGD set-up on the CREMA-D-sized synthetic corpus (73 training clients, 10% a
round, batch 20, server lr 0.1; 200 rounds by default). Both runs select the same clients with
the same seeds (fed_ser.core.schedule), so their final test UAR must agree: the ratio compares like
with like. Target: Flower within 3x of the loop. Beside them, in the same run, a plain Flower app
(benchmarks/_plain_flower.py: Flower's FedAvg over ClientApps that do no work) with the model's
arrays and with one-element arrays: Flower's own per-round cost, and how much of it is the payload.
Each Flower run is traced message by message along Flower's own path (benchmarks/_message_path.py):
where a round's milliseconds go, for fed-ser and for the plain app, side by side.

    python benchmarks/flower_vs_loop.py [fl.rounds=200] [data.scale=0.5]
"""

from __future__ import annotations

import tempfile
import time

from _common import parser, prepared, report
from _message_path import breakdown, traced
from _plain_flower import plain_flower_rounds

from fed_ser.core.model import build_model
from fed_ser.core.schedule import clients_per_round
from fed_ser.data.federated import FederatedData
from fed_ser.engines.inprocess import run_inprocess
from fed_ser.experiments.cli import run_fl, run_settings, seconds_per_round


def main() -> None:
    args = parser(__doc__).parse_args()
    overrides = ["dataset=crema_d", "fl=fedsgd", "fl.rounds=200", *args.overrides]
    cfg, path = prepared(overrides, ["crema_d"])
    cfg.fl.eval_every = int(cfg.fl.rounds)  # evaluate once, at the end, in both
    data = FederatedData.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with traced() as trace:
            res = run_fl(cfg, path, f"{tmp}/flower")
        flower_total = time.perf_counter() - t
        path_fed_ser = breakdown(trace)
        flower_rounds = seconds_per_round(res) * int(cfg.fl.rounds)  # the rounds: not the nodes' discovery
        s = run_settings(cfg, path, "")
        t = time.perf_counter()
        ref = run_inprocess(data, s)
        loop = time.perf_counter() - t
    rounds = int(cfg.fl.rounds)
    shapes = {k: tuple(v.shape) for k, v in build_model(data.X.shape[1], s.dropout, s.seed).state_dict().items()}
    with traced() as trace:
        plain = plain_flower_rounds(data.num_clients, s.fraction, rounds, shapes)
    path_plain = breakdown(trace)
    with traced() as trace:
        tiny = plain_flower_rounds(data.num_clients, s.fraction, rounds, {"w": (1,)})
    path_tiny = breakdown(trace)
    per = lambda x: f"{x:.1f} s ({1000 * x / rounds:.1f} ms/round)"
    numbers = {"clients": data.num_clients, "rounds": rounds, "flower_total_s": flower_total,
               "flower_rounds_s": flower_rounds, "loop_s": loop, "ratio_rounds": flower_rounds / loop,
               "ratio_total": flower_total / loop, "uar_flower": res["final"]["test_uar"], "uar_loop": ref["uar"],
               "plain_flower_rounds_s": plain, "plain_flower_tiny_rounds_s": tiny,
               "message_path_ms": {"fed_ser": path_fed_ser, "plain": path_plain, "plain_tiny": path_tiny}}
    stage = lambda key: " / ".join(f"{p[key]:.1f}" for p in (path_fed_ser, path_plain, path_tiny))
    report("Flower simulation vs in-process loop (FedSGD)", [
        ("clients / rounds", f"{data.num_clients} / {rounds} ({clients_per_round(data.num_clients, s.fraction)} a round)"),
        ("in-process loop", per(loop)),
        ("Flower, rounds only", per(flower_rounds)),
        ("plain Flower app, same arrays", f"{per(plain)}: Flower's own message path, no work"),
        ("plain Flower app, 1-float arrays", f"{per(tiny)}: without the payload"),
        ("fed-ser over the plain app", f"{flower_rounds / plain:.2f}x (target <= 100 ms/round)"),
        ("Flower, incl. Ray start", f"{flower_total:.1f} s"),
        ("ratio (rounds only)", f"{flower_rounds / loop:.2f}x  (target <= 3x)"),
        ("ratio (incl. start)", f"{flower_total / loop:.2f}x"),
        ("final test UAR", f"Flower {res['final']['test_uar']:.4f} / loop {ref['uar']:.4f} (same clients and seeds)"),
        ("message path, ms (median round)", "fed-ser / plain app / plain app with 1-float arrays"),
        ("  round", stage("round_ms")),
        ("  server between rounds", f"{stage('server_between_rounds_ms')}: aggregation, recording, evaluation, next messages"),
        ("  push -> last reply pulled", stage("messages_ms")),
        ("  a message waits for pickup", f"{stage('pickup_wait_ms')}: the engine's feeder polls every node, then waits 0.1 s"),
        ("  ... for a free actor", stage("queue_wait_ms")),
        ("  ... in the Ray call", f"{stage('clientapp_call_ms')}: serialise, ClientApp, reply"),
        ("  the round's Ray calls, summed", f"{stage('clientapp_serial_ms')} ({path_fed_ser['messages_per_round']:.1f} messages a round)"),
        ("  ... reply to state", stage("store_ms")),
        ("  ... until the ServerApp pulls it", f"{stage('pull_wait_ms')}: fed-ser polls every fl.poll_interval, Flower's grid every 0.1 s"),
    ], args.json, numbers)


if __name__ == "__main__":
    main()
