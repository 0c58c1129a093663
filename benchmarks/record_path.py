"""Recording at the speed of the disk: the update store's append path against a plain write.

1. The same bytes three ways, in one run, into files on the same disk: a plain Python write of
   each update's float32 buffer with one fsync per round (the reference), the store's appends with
   group commit (one fsync per round, as the engines and the strategy record), and the store's
   appends with an fsync after every record. Prints GB/s of each and the store's ratio to the plain
   write (target: the store at >= 1 GB/s), then a profile of the appends: where the time goes.
2. The vectorised shadow engine on the synthetic shadow corpora with and without recording (all
   layers, float32): the ratio recording adds (target: <= 1.5x), beside a plain write of the same
   bytes in the same rounds (one fsync a round): the engine's time plus that write is what recording
   costs when nothing overlaps. Best of three, alternating, in the same run.

    python benchmarks/record_path.py [fl.rounds=200] [--updates 700] [--per-round 7]
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, parser, prepared, report

from fed_ser.data.federated import FederatedData
from fed_ser.data.synthetic import PAPER_CORPORA
from fed_ser.engines.vectorized import run_vectorized
from fed_ser.experiments.cli import run_settings
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore

SHAPES = {"dense1.weight": (256, 988), "dense1.bias": (256,), "dense2.weight": (128, 256), "dense2.bias": (128,),
          "out.weight": (4, 128), "out.bias": (4,)}  # the SER model on Emo-Base: 1.15 MB a float32 update


def updates(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` distinct float32 updates shaped as the SER model's gradients (as an engine hands them over)."""
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, s in SHAPES.items()}
    return [{k: v + np.float32(i) for k, v in base.items()} for i in range(n)]


def _write_rounds(path: Path, rounds) -> float:
    """Seconds to write each round's buffers with one open file and an fsync a round (the plain reference)."""
    t = time.perf_counter()
    with open(path, "ab") as fh:
        for buffers in rounds:
            for b in buffers:
                fh.write(b)
            fh.flush()
            os.fsync(fh.fileno())
    return time.perf_counter() - t


def plain_write(path: Path, ups: list[dict[str, np.ndarray]], per_round: int) -> float:
    """Seconds to write every update's bytes, ``per_round`` updates a round (the reference for the store)."""
    return _write_rounds(path, ([a.data for u in ups[i:i + per_round] for a in u.values()]
                                for i in range(0, len(ups), per_round)))


def store_write(path: Path, ups: list[dict[str, np.ndarray]], per_round: int, group: bool) -> float:
    """Seconds for the store to append every update (group commit: one fsync per round)."""
    store = UpdateStore(path, mode="a")
    t = time.perf_counter()
    for i, u in enumerate(ups):
        store.append(u, round=i // per_round + 1, client=i % per_round, num_examples=20, sync=not group)
        if group and (i + 1) % per_round == 0:
            store.sync()
    store.sync()
    store.close()
    return time.perf_counter() - t


def plain_write_rounds(path: Path, total: int, rounds: int, chunk: int = 1 << 20) -> float:
    """Seconds to write ``total`` bytes in ``rounds`` equal rounds, one fsync a round (what any recorder of
    those bytes must at least spend on this disk)."""
    buf = memoryview(np.random.default_rng(0).bytes(chunk))
    per_round = total // rounds
    one_round = [buf] * (per_round // chunk) + [buf[:per_round % chunk]]
    return _write_rounds(path, (one_round for _ in range(rounds)))


def engine_ratio(overrides: list[str], repeats: int = 3) -> dict[str, float]:
    """Vectorised engine wall time without and with recording (all layers, float32), and a plain write of
    the bytes it records in the same rounds; best of ``repeats``, alternating, in one run."""
    shadow = [c for c in PAPER_CORPORA if c != "iemocap"]
    cfg, path = prepared(["fl=fedsgd", "fl.rounds=200", *overrides], shadow, share=0.8, tag="shadow-" + "+".join(shadow))
    data = FederatedData.load(path)
    s = run_settings(cfg, path, "")
    run_vectorized(data, s.__class__(**{**s.__dict__, "rounds": 1}), progress=False)  # warm-up
    times: dict[str, list[float]] = {"engine_s": [], "engine_recording_s": [], "plain_write_s": []}
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        for _ in range(repeats):
            t = time.perf_counter()
            run_vectorized(data, s, None, progress=False)
            times["engine_s"].append(time.perf_counter() - t)
            store = UpdateStore(Path(tmp) / "store", mode="a")
            t = time.perf_counter()
            run_vectorized(data, s, UpdateRecorder(store, s.algorithm, s.lr, None, False), progress=False)
            times["engine_recording_s"].append(time.perf_counter() - t)
            out["updates"], out["store_bytes"] = len(store), store.data_path.stat().st_size
            store.close()
            shutil.rmtree(Path(tmp) / "store")
            times["plain_write_s"].append(plain_write_rounds(Path(tmp) / "plain.bin", out["store_bytes"], s.rounds))
            (Path(tmp) / "plain.bin").unlink()
    out.update({k: min(v) for k, v in times.items()})
    out["ratio"] = out["engine_recording_s"] / out["engine_s"]
    out["serial_ratio"] = (out["engine_s"] + out["plain_write_s"]) / out["engine_s"]
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--updates", type=int, default=700)
    p.add_argument("--per-round", type=int, default=7)
    p.add_argument("--skip-engine", action="store_true")
    args = p.parse_args()
    ups = updates(args.updates)
    nbytes = sum(a.nbytes for u in ups for a in u.values())
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:  # the disk the runs write to, not a tmpfs
        t = Path(tmp)
        # alternate the order, so neither side always meets a warmer page cache; best of three
        plain, group, each = [], [], []
        for rep in range(3):
            plain.append(plain_write(t / f"plain{rep}.bin", ups, args.per_round))
            group.append(store_write(t / f"group{rep}", ups, args.per_round, group=True))
            each.append(store_write(t / f"each{rep}", ups, args.per_round, group=False))
            for f in t.iterdir():  # free the disk before the next repetition
                f.unlink() if f.is_file() else shutil.rmtree(f)
        prof = cProfile.Profile()
        prof.enable()
        store_write(t / "profiled", ups, args.per_round, group=True)
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
    gbs = lambda s: nbytes / min(s) / 1e9
    numbers = {"bytes": nbytes, "updates": args.updates, "per_round": args.per_round,
               "plain_gb_s": gbs(plain), "store_group_gb_s": gbs(group), "store_each_gb_s": gbs(each),
               "store_vs_plain": min(group) / min(plain)}
    rows = [
        (f"{args.updates} updates of {nbytes / args.updates / 1e6:.2f} MB", f"{args.per_round} a round"),
        ("plain write, fsync a round", f"{numbers['plain_gb_s']:.2f} GB/s"),
        ("store, group commit", f"{numbers['store_group_gb_s']:.2f} GB/s  ({numbers['store_vs_plain']:.2f}x the plain write's time; "
                                f"target >= 1 GB/s)"),
        ("store, fsync per record", f"{numbers['store_each_gb_s']:.2f} GB/s"),
    ]
    if not args.skip_engine:
        eng = engine_ratio(args.overrides)
        numbers["engine"] = eng
        rows += [("vectorised engine, no recording", f"{eng['engine_s']:.2f} s"),
                 ("vectorised engine, recording", f"{eng['engine_recording_s']:.2f} s for {eng['updates']:,} updates "
                                                  f"({eng['store_bytes'] / 1e9:.2f} GB): {eng['ratio']:.2f}x  (target <= 1.5x)"),
                 ("plain write of those bytes, fsync a round", f"{eng['plain_write_s']:.2f} s "
                                                               f"({eng['store_bytes'] / eng['plain_write_s'] / 1e9:.2f} GB/s); "
                                                               f"engine + plain write {eng['serial_ratio']:.2f}x")]
    report("Record path", rows, args.json, numbers)
    print("\nprofile of the store's appends (group commit), by own time:")
    print("\n".join(text.getvalue().splitlines()[:24]))


if __name__ == "__main__":
    main()
