"""Attack training speed: updates a second of the attack CNN as it trains now vs as it trained when issue 20
was filed, and the ASR of both.

The main job's threat model (private IEMOCAP, shadow CREMA-D + MSP-Improv, synthetic, ``size=quick``)
is recorded on the vectorised engine (private and shadow, same seed), then the same attack (same
shadow updates, seed and epochs) is trained three times:

* the issue's reference, as the attack trained when the issue was filed: float32, contiguous (NCHW)
  feature maps, each block's ReLU before its max-pooling (the same function: both are monotone);
* ``attack.precision=float32``: float32 on channels-last maps, pooling before the ReLU;
* ``attack.precision=auto``: bfloat16 autocast where the CPU has native bf16, else the same as float32.

Prints shadow updates trained a second in each (target: auto >= 5x the issue's reference), the time
per update-epoch (each epoch's validation pass and the one-time shadow statistics included), and the
ASR on the private clients of each, with its interval and AUC (target: within 1 point). Beside
them, the floor on this CPU: the attack's multiply-adds a training step (counted on the model) at the
rate this CPU multiplies large float32 matrices (``torch.matmul``, measured in the same run). ``attack=paper`` measures the published layout instead.

    python benchmarks/attack_training.py [attack=paper] [attack.max_epochs=6] [--json FILE]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, parser, report
from torch import nn

import attacks.inference.train as attack_train
from attacks.inference.data import UpdateDataset, labelled_updates
from attacks.inference.evaluate import evaluate_attack, summarize
from attacks.inference.model import AttackModel
from attacks.inference.train import native_bfloat16, predict, train_attack
from fed_ser.data.federated import FederatedData
from fed_ser.experiments.attack import attack_config, threat_model
from fed_ser.experiments.cli import run_vectorized_fl
from fed_ser.experiments.config import load_config
from fed_ser.recording.store import UpdateStore


def record(cfg, prepared: Path, out: Path) -> UpdateStore:
    run_vectorized_fl(cfg, prepared, str(out), str(out / "updates"))
    return UpdateStore(out / "updates")


def _issue_reference(model: AttackModel, dtype: torch.dtype) -> AttackModel:
    """The attack as it trained when issue 20 was filed: float32 on contiguous maps, ReLU before pooling,
    and a 1 x 1 pool computed (since skipped as the identity it is)."""
    model.compute_dtype = torch.float32
    for branch in model.branches.values():
        mods = [nn.MaxPool2d((1, 1), ceil_mode=True) if isinstance(m, nn.Identity) else m for m in branch.cnn]
        for i in range(len(mods) - 1):
            if isinstance(mods[i], nn.MaxPool2d) and isinstance(mods[i + 1], nn.ReLU):
                mods[i], mods[i + 1] = nn.ReLU(), mods[i]  # then: a ReLU that was not in place
        branch.cnn = nn.Sequential(*mods)
    return model


def measure(cfg, shadow: UpdateStore, shadow_data: Path, private: UpdateStore, private_data: Path, precision: str) -> dict:
    """Train the attack at ``precision`` (``issue``: the issue's reference); its training time per shadow
    update-epoch and its ASR."""
    issue = precision == "issue"
    if issue:
        precision = "float32"
        real, attack_train._for_compute = attack_train._for_compute, _issue_reference
    try:
        return _measure(cfg, shadow, shadow_data, private, private_data, precision) | {"precision": "issue" if issue else precision}
    finally:
        if issue:
            attack_train._for_compute = real


def step_flops(cfg, shadow: UpdateStore) -> float:
    """Floating-point operations of one update's training step (forward, and backward to every weight
    and every feature map but the input): 2 x multiply-adds, counted on the model's convolutions and
    linear layers."""
    acfg = attack_config(cfg)
    info = shadow.updates()[0]
    shapes = {l: tuple(info.layers[f"{l}.weight"]) for l in acfg.layers}
    model = AttackModel(shapes, channels=acfg.channels, kernel=acfg.kernel, pools=acfg.pools, dropout=acfg.dropout,
                        first_stride=acfg.first_stride)
    macs = {"fwd": 0, "first": 0}

    def count(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            n = out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            n = mod.in_features * mod.out_features
        macs["fwd"] += n
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 1:
            macs["first"] += n  # its input is the update: no gradient to it

    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.register_forward_hook(count)
    with torch.no_grad():
        model({l: (torch.zeros(1, 1, *shapes[l]), torch.zeros(1, shapes[l][0])) for l in acfg.layers})
    return 2.0 * (3 * macs["fwd"] - macs["first"])


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    """This CPU's float32 matrix-multiply rate (``torch.matmul`` of two n x n matrices, all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2.0 * n**3 * repeats / (time.perf_counter() - t)


def _measure(cfg, shadow: UpdateStore, shadow_data: Path, private: UpdateStore, private_data: Path, precision: str) -> dict:
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
        issue = measure(cfg, shadow, tm.shadow_data, private, tm.private_data, "issue")
        f32 = measure(cfg, shadow, tm.shadow_data, private, tm.private_data, "float32")
        new = measure(cfg, shadow, tm.shadow_data, private, tm.private_data, "auto")
        flops = step_flops(cfg, shadow)
    rate = matmul_flops_per_s()
    floor_ms = 1000 * flops / rate
    speedup = new["updates_per_s"] / issue["updates_per_s"]
    line = lambda m: f"{m['updates_per_s']:.1f} updates/s ({m['ms_per_update_epoch']:.1f} ms an update-epoch), " + _asr(m)
    rows = [("CPU with native bfloat16", str(native_bfloat16())),
            ("attack", f"{cfg.attack.channels} channels, pools {list(cfg.attack.pools)}, first stride {cfg.attack.first_stride}; "
                       f"{issue['updates']} shadow updates, {issue['epochs']} / {f32['epochs']} / {new['epochs']} epochs"),
            ("issue's reference (float32, NCHW, ReLU then pool)", line(issue)),
            ("attack.precision=float32 (channels-last, pool then ReLU)", line(f32)),
            (f"attack.precision=auto ({new['dtype']})", line(new)),
            ("speed-up over the issue's reference", f"{speedup:.2f}x (target >= 5x); float32 alone "
                                                    f"{f32['updates_per_s'] / issue['updates_per_s']:.2f}x"),
            ("ASR difference", f"{100 * (new['asr'] - issue['asr']):+.1f} points (target within 1)"),
            ("float32 floor on this CPU", f"{flops / 1e9:.2f} GFLOP a training step per update at torch.matmul's "
                                          f"{rate / 1e9:.0f} GFLOP/s = {floor_ms:.1f} ms an update-epoch; float32 runs at "
                                          f"{floor_ms / f32['ms_per_update_epoch']:.0%} of it")]
    report("Attack training: now vs the issue's reference (same shadow updates, seed and epochs)", rows, args.json,
           {"issue": issue, "float32": f32, "auto": new, "speedup": speedup, "step_flops": flops,
            "matmul_flops_per_s": rate, "float32_floor_ms": floor_ms})


if __name__ == "__main__":
    main()
