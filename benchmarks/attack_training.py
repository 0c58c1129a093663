"""Attack training speed: updates a second of the attack CNN under bfloat16 vs float32, and the ASR of both.

The main job's threat model (private IEMOCAP, shadow CREMA-D + MSP-Improv, synthetic, ``size=quick``)
is recorded on the vectorised engine (private and shadow, same seed), then the same attack (same
shadow updates, seed and epochs) is trained twice: ``attack.precision=float32`` (the reference:
float32 throughout, as before bf16 support) and ``attack.precision=auto`` (bfloat16 autocast and
channels-last maps where the CPU has native bf16). Prints shadow updates trained a second in each
(target: >= 5x), the time per update-epoch, and the ASR on the private clients of each, with its interval and AUC
(target: within 1 point). ``attack=paper`` measures the published layout instead.

    python benchmarks/attack_training.py [attack=paper] [attack.max_epochs=6] [--json FILE]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import ROOT, parser, report

from attacks.inference.data import UpdateDataset, labelled_updates
from attacks.inference.evaluate import evaluate_attack, summarize
from attacks.inference.train import native_bfloat16, predict, train_attack
from fed_ser.data.federated import FederatedData
from fed_ser.experiments.attack import attack_config, threat_model
from fed_ser.experiments.cli import run_vectorized_fl
from fed_ser.experiments.config import load_config
from fed_ser.recording.store import UpdateStore


def record(cfg, prepared: Path, out: Path) -> UpdateStore:
    run_vectorized_fl(cfg, prepared, str(out), str(out / "updates"))
    return UpdateStore(out / "updates")


def measure(cfg, shadow: UpdateStore, shadow_data: Path, private: UpdateStore, private_data: Path, precision: str) -> dict:
    """Train the attack at ``precision``; its training time per shadow update-epoch and its ASR."""
    acfg = replace(attack_config(cfg), precision=precision)
    su, sl = labelled_updates(shadow, FederatedData.load(shadow_data).client_gender)
    t = time.perf_counter()
    trained = train_attack(shadow, su, sl, acfg, progress=False)
    seconds = time.perf_counter() - t
    n = min(acfg.max_updates or len(su), len(su))
    epochs = len(trained.history)
    pu, pl = labelled_updates(private, FederatedData.load(private_data).client_gender)
    fused, _ = predict(trained.model, UpdateDataset(private, pu, pl, acfg.layers, trained.stats))
    ev = evaluate_attack(lambda idx: float(fused[idx].mean()), fused, np.array([u.client for u in pu]), pl,
                         trials=int(cfg.attack.trials), seed=int(cfg.attack.seed))
    summary = summarize([ev], seed=int(cfg.attack.seed))
    return {"precision": precision, "dtype": str(trained.model.compute_dtype), "seconds": seconds, "updates": n, "epochs": epochs,
            "updates_per_s": n * epochs / seconds, "ms_per_update_epoch": 1000 * seconds / (n * epochs),
            "asr": summary["asr"], "asr_ci": summary["asr_ci"], "auc": summary["auc"], "clients": summary["clients"]}


def _asr(m: dict) -> str:
    lo, hi = m["asr_ci"]
    return f"ASR {100 * m['asr']:.1f}% [95% interval {100 * lo:.1f}, {100 * hi:.1f}] on {m['clients']} clients, AUC {m['auc']:.3f}"


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    cfg = load_config(args.overrides, "experiment")
    tm = threat_model(cfg, 0)
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        private = record(cfg, tm.private_data, Path(tmp) / "private")
        shadow = record(cfg, tm.shadow_data, Path(tmp) / "shadow")
        ref = measure(cfg, shadow, tm.shadow_data, private, tm.private_data, "float32")
        new = measure(cfg, shadow, tm.shadow_data, private, tm.private_data, "auto")
    speedup = new["updates_per_s"] / ref["updates_per_s"]
    rows = [("CPU with native bfloat16", str(native_bfloat16())),
            ("attack", f"{cfg.attack.channels} channels, pools {list(cfg.attack.pools)}, first stride {cfg.attack.first_stride}; "
                       f"{ref['updates']} shadow updates, {ref['epochs']} / {new['epochs']} epochs"),
            ("float32 (reference)", f"{ref['updates_per_s']:.1f} updates/s ({ref['ms_per_update_epoch']:.1f} ms an update-epoch), " +
                                    _asr(ref)),
            (f"auto ({new['dtype']})", f"{new['updates_per_s']:.1f} updates/s ({new['ms_per_update_epoch']:.1f} ms an update-epoch), " +
                                       _asr(new)),
            ("speed-up", f"{speedup:.2f}x (target >= 5x)"),
            ("ASR difference", f"{100 * (new['asr'] - ref['asr']):+.1f} points (target within 1)")]
    report("Attack training: bfloat16 vs float32 (same shadow updates, seed and epochs)", rows, args.json,
           {"float32": ref, "auto": new, "speedup": speedup})


if __name__ == "__main__":
    main()
