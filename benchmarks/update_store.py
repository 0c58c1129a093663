"""Update store: bytes per update (float16 vs raw float32), ASR unchanged, attack peak memory.

1. The same private and shadow FedSGD runs (vectorised engine, same seed) recorded twice: raw
   float32 and ``recorder.float16=true``. Prints bytes per update and their ratio (target
   <= 0.5x), and the ASR of the same attack trained and evaluated on each (target: within 1 point).
2. The attack's peak resident memory when it trains (one epoch) on 1,000 and on 10,000 recorded
   shadow updates, each in a fresh process (target: flat, under 2 GB).

    python benchmarks/update_store.py [fl.rounds=100] [--memory-sizes 1000 10000]
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import parser, peak_rss_mb, prepared, report

from attacks.inference.data import UpdateDataset, labelled_updates
from attacks.inference.evaluate import attack_success_rate
from attacks.inference.train import AttackConfig, predict, train_attack
from fed_ser.data.federated import FederatedData
from fed_ser.engines.vectorized import run_vectorized
from fed_ser.experiments.cli import run_settings
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore

ATTACK = dict(layers=["dense1", "dense2", "out"], pools=(1, 4, 4), first_stride=4, max_epochs=6, max_updates=1000)


def record(data_path: Path, cfg, out: Path, float16: bool, rounds: int | None = None) -> UpdateStore:
    s = run_settings(cfg, data_path, "")
    if rounds:
        s = s.__class__(**{**s.__dict__, "rounds": rounds})
    store = UpdateStore(out, mode="a")
    run_vectorized(FederatedData.load(data_path), s, UpdateRecorder(store, s.algorithm, s.lr, None, float16), progress=False)
    return store


def asr(shadow: UpdateStore, shadow_data: Path, private: UpdateStore, private_data: Path) -> float:
    acfg = AttackConfig(**ATTACK)
    su, sl = labelled_updates(shadow, FederatedData.load(shadow_data).client_gender)
    trained = train_attack(shadow, su, sl, acfg, progress=False)
    pu, pl = labelled_updates(private, FederatedData.load(private_data).client_gender)
    fused, _ = predict(trained.model, UpdateDataset(private, pu, pl, acfg.layers, trained.stats))
    return attack_success_rate(fused, np.array([u.client for u in pu]), pl, 10, 1, 0)


def memory_child(store_dir: str, data_path: str, n: int) -> None:
    """Train the attack for one epoch on ``n`` updates of the store; print peak RSS as JSON."""
    store = UpdateStore(store_dir)
    su, sl = labelled_updates(store, FederatedData.load(data_path).client_gender)
    train_attack(store, su, sl, AttackConfig(**{**ATTACK, "max_epochs": 1, "max_updates": n}), progress=False)
    print(json.dumps({"updates": min(n, len(su)), "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    p = parser(__doc__)
    p.add_argument("--private", default="iemocap")
    p.add_argument("--memory-sizes", type=int, nargs=2, default=[1000, 10000])
    p.add_argument("--memory-only", action="store_true", help="skip the float32/float16 ASR comparison")
    args = p.parse_args()
    overrides = ["fl=fedsgd", "fl.rounds=100", *args.overrides]
    shadow = sorted({"iemocap", "crema_d", "msp_improv"} - {args.private})
    cfg, priv_path = prepared(overrides, [args.private])
    _, shadow_path = prepared(overrides, shadow, share=0.8, tag="shadow-" + "+".join(shadow))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        bpu, asrs = {32: float("nan"), 16: float("nan")}, {32: float("nan"), 16: float("nan")}
        if not args.memory_only:
            stores = {bits: (record(shadow_path, cfg, t / f"shadow{bits}", bits == 16),
                             record(priv_path, cfg, t / f"private{bits}", bits == 16)) for bits in (32, 16)}
            bpu = {bits: stores[bits][0].bytes_per_update() for bits in (32, 16)}
            asrs = {bits: asr(stores[bits][0], shadow_path, stores[bits][1], priv_path) for bits in (32, 16)}
        per_round = max(int(0.1 * FederatedData.load(shadow_path).num_clients), 1)
        big = record(shadow_path, cfg, t / "big", True, rounds=math.ceil(max(args.memory_sizes) / per_round))
        mem = {}
        for n in args.memory_sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(big.path), str(shadow_path), str(n)],
                                 check=True, capture_output=True, text=True).stdout
            mem[n] = json.loads(out.strip().splitlines()[-1])
    small, large = args.memory_sizes
    numbers = {"bytes_per_update": bpu, "ratio": bpu[16] / bpu[32], "asr": asrs,
               "asr_difference_points": 100 * (asrs[16] - asrs[32]), "peak_rss_mb": {str(k): v for k, v in mem.items()},
               "memory_ratio": mem[large]["peak_rss_mb"] / mem[small]["peak_rss_mb"]}
    report("Update store and attack memory", [
        ("bytes/update float32", f"{bpu[32]:,.0f}"),
        ("bytes/update float16", f"{bpu[16]:,.0f}  ratio {bpu[16] / bpu[32]:.3f}x  (target <= 0.5x)"),
        ("ASR float32 / float16", f"{100 * asrs[32]:.1f}% / {100 * asrs[16]:.1f}%  "
                                  f"({numbers['asr_difference_points']:+.1f} points; target within 1)"),
        (f"attack peak RSS, {mem[small]['updates']:,} updates", f"{mem[small]['peak_rss_mb']:.0f} MB"),
        (f"attack peak RSS, {mem[large]['updates']:,} updates", f"{mem[large]['peak_rss_mb']:.0f} MB  "
                                                                f"ratio {numbers['memory_ratio']:.2f}x  (target: flat, < 2 GB)"),
    ], args.json, numbers)


if __name__ == "__main__":
    main()
