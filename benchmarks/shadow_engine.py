"""Shadow-update generation: the vectorised engine vs a per-client loop.

The attacker's shadow training (the two non-private corpora, 80% of their data, FedSGD by
default) run twice with the same seed: once client by client through the shared local loop
(fed_ser.engines.inprocess, the kind of loop the paper's code used), once with every client of a round
stacked under torch.func.vmap (fed_ser.engines.vectorized). Prints the speed-up with and without
recording, checks that both recorded the same updates, and profiles the vectorised run.
Target: at least 50x, updates equal to 1e-5.

    python benchmarks/shadow_engine.py [fl=fedavg] [fl.rounds=200] [--private iemocap]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import tempfile
import time

from _common import parser, prepared, report

from fed_ser.data.federated import FederatedData
from fed_ser.data.synthetic import PAPER_CORPORA as CORPORA
from fed_ser.engines.inprocess import run_inprocess
from fed_ser.engines.vectorized import run_vectorized
from fed_ser.experiments.cli import run_settings
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore, difference_by_round


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--private", default="iemocap", choices=CORPORA)
    args = p.parse_args()
    shadow = [c for c in CORPORA if c != args.private]
    cfg, path = prepared(["fl=fedsgd", "fl.rounds=200", *args.overrides], shadow, share=0.8, tag="shadow-" + "+".join(shadow))
    data = FederatedData.load(path)
    s = run_settings(cfg, path, "")
    run_vectorized(data, s.__class__(**{**s.__dict__, "rounds": 1}), progress=False)  # warm-up (torch.func set-up)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("loop", run_inprocess), ("vectorised", run_vectorized)):
            kw = {} if name == "loop" else {"progress": False}
            t = time.perf_counter()
            fn(data, s, None, **kw)
            times[name] = time.perf_counter() - t
            rec = UpdateRecorder(UpdateStore(f"{tmp}/{name}", mode="a"), s.algorithm, s.lr, s.layers(), s.recorder_float16)
            t = time.perf_counter()
            fn(data, s, rec, **kw)
            times[name + "+store"] = time.perf_counter() - t
        by_round = difference_by_round(UpdateStore(f"{tmp}/loop"), UpdateStore(f"{tmp}/vectorised"))
        diff = by_round[1]  # same global model: the engines' arithmetic alone
        drift = next((r for r, d in sorted(by_round.items()) if d > 1e-5), None)
        n_updates = len(UpdateStore(f"{tmp}/loop").updates(kind="gradient" if s.algorithm == "fedsgd" else "delta"))
    prof = cProfile.Profile()
    prof.enable()
    run_vectorized(data, s, None, progress=False)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
    print(text.getvalue().split("\n", 6)[-1])
    ratio, ratio_store = times["loop"] / times["vectorised"], times["loop+store"] / times["vectorised+store"]
    numbers = {"algorithm": s.algorithm, "clients": data.num_clients, "rounds": s.rounds, "updates": n_updates,
               **{f"{k}_s": v for k, v in times.items()}, "speedup": ratio, "speedup_with_store": ratio_store,
               "max_abs_difference_round1": diff, "first_round_over_1e-5": drift,
               "max_abs_difference_last_round": by_round[max(by_round)]}
    report(f"Shadow updates ({s.algorithm}, {'+'.join(shadow)}): vectorised vs per-client loop", [
        ("clients / rounds / updates", f"{data.num_clients} / {s.rounds} / {n_updates}"),
        ("per-client loop", f"{times['loop']:.2f} s  ({1000 * times['loop'] / n_updates:.2f} ms/update)"),
        ("vectorised", f"{times['vectorised']:.2f} s  ({1000 * times['vectorised'] / n_updates:.2f} ms/update)"),
        ("speed-up", f"{ratio:.1f}x  (target >= 50x)"),
        ("with recording", f"loop {times['loop+store']:.2f} s, vectorised {times['vectorised+store']:.2f} s: {ratio_store:.1f}x"),
        ("max |difference|, round 1", f"{diff:.2e}  (target <= 1e-5; same global model)"),
        ("drift over the run", f"first round above 1e-5: {drift}; last round {by_round[max(by_round)]:.2e} "
                               "(rounding differences compound through training)"),
    ], args.json, numbers)


if __name__ == "__main__":
    main()
