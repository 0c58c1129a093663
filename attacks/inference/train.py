"""Training the attack model on shadow updates, streamed from disk with a progress bar.

``attack.precision`` picks the arithmetic. ``auto`` trains and predicts under bfloat16 autocast on a
CPU that computes bfloat16 natively (AVX-512 BF16 / AMX, where oneDNN has bf16 convolution kernels),
in float32 elsewhere; ``float32`` and ``bfloat16`` ask for one. Either way the feature maps are
channels-last, the layout oneDNN's convolution kernels prefer. ``benchmarks/attack_training.py``
measures the updates trained a second under each, with the ASR of both (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from attacks.inference.data import LayerStats, UpdateDataset, shadow_stats
from attacks.inference.evaluate import NotFinite
from attacks.inference.model import AttackModel
from attacks.inference.settings import PRECISIONS, AttackConfig
from fed_ser.recording.store import UpdateInfo, UpdateStore


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's bf16 kernels: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> torch.dtype:
    """The compute dtype of ``attack.precision``; bfloat16 asked for on a CPU without it is an error naming the key."""
    if precision not in PRECISIONS:
        raise ValueError(f"attack.precision: {precision!r} is not one of {PRECISIONS}")
    if precision == "float32" or (precision == "auto" and not native_bfloat16()):
        return torch.float32
    if not native_bfloat16():
        raise ValueError("attack.precision=bfloat16: this CPU has no native bfloat16 (AVX-512 BF16 / AMX); use auto or float32")
    return torch.bfloat16


def _for_compute(model: AttackModel, dtype: torch.dtype) -> AttackModel:
    """The model set to compute in ``dtype`` (:attr:`AttackModel.compute_dtype`, which :func:`predict` uses),
    with channels-last convolution weights (and so feature maps), which oneDNN's kernels prefer in
    bfloat16 and in float32 alike (benchmarks/README.md: the same ASR, fewer milliseconds an update-epoch)."""
    model.compute_dtype = dtype
    return model.to(memory_format=torch.channels_last)


def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@dataclass
class TrainedAttack:
    model: AttackModel
    stats: dict[str, LayerStats]
    history: list[dict]


def _collate(items):
    batch = {l: (torch.stack([it[0][l][0] for it in items]), torch.stack([it[0][l][1] for it in items]))
             for l in items[0][0]}
    return batch, torch.tensor([it[1] for it in items])


def _uar(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean([np.mean((p[y == c] > 0.5) == c) for c in (0, 1) if np.any(y == c)]))


def train_attack(store: UpdateStore, updates: list[UpdateInfo], labels: np.ndarray, cfg: AttackConfig,
                 progress: bool = True) -> TrainedAttack:
    """Fit the attack model on labelled shadow updates; early-stop on held-out shadow clients."""
    if len(set(labels.tolist())) < 2:
        raise ValueError("attack training data holds one gender only")
    dtype = resolve_precision(cfg.precision)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.max_updates and len(updates) > cfg.max_updates:
        keep = np.sort(rng.choice(len(updates), cfg.max_updates, replace=False))
        updates, labels = [updates[i] for i in keep], labels[keep]
    clients = np.array([(u.client) for u in updates])
    uniq = np.unique(clients)
    val_clients = set(rng.choice(uniq, max(1, int(len(uniq) * cfg.val_share)), replace=False).tolist())
    is_val = np.array([c in val_clients for c in clients])
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    stats = shadow_stats(store, [updates[i] for i in train_idx], cfg.layers)
    ds = UpdateDataset(store, updates, labels, cfg.layers, stats)
    shapes = {l: tuple(updates[0].layers[f"{l}.weight"]) for l in cfg.layers}
    model = _for_compute(AttackModel(shapes, channels=cfg.channels, kernel=cfg.kernel, pools=cfg.pools, dropout=cfg.dropout,
                                     first_stride=cfg.first_stride), dtype)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=3, factor=0.2)
    loss_fn = nn.CrossEntropyLoss()
    train_dl = DataLoader(Subset(ds, train_idx), batch_size=cfg.batch_size, shuffle=True, collate_fn=_collate,
                          generator=torch.Generator().manual_seed(cfg.seed))
    best, best_state, bad, history = -1.0, None, 0, []
    for epoch in range(cfg.max_epochs):
        model.train()
        total = 0.0
        for batch, y in tqdm(train_dl, desc=f"attack epoch {epoch + 1}", leave=False, disable=not progress or None):
            opt.zero_grad(set_to_none=True)
            with _autocast(dtype):
                logits = model(batch)
                loss = sum(loss_fn(lg.float(), y) for lg in logits.values())
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
        p_val = predict(model, Subset(ds, val_idx), cfg.batch_size)[0] if len(val_idx) else np.zeros(0)
        val_uar = _uar(labels[val_idx], p_val) if len(val_idx) else float("nan")
        history.append({"epoch": epoch + 1, "train_loss": total / max(len(train_idx), 1), "val_uar": val_uar})
        if not np.isfinite(history[-1]["train_loss"]):
            raise NotFinite(f"the attack CNN's loss is {history[-1]['train_loss']} in epoch {epoch + 1}: the shadow "
                             "updates it trains on are not finite (a diverged shadow federation)")
        if progress:
            print(f"[attack] epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f} shadow-val UAR {val_uar:.3f}", flush=True)
        sched.step(val_uar)
        if val_uar > best:
            best, bad = val_uar, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainedAttack(model, stats, history)


@torch.no_grad()
def predict(model: AttackModel, ds, batch_size: int = 64) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fused P(female) and per-layer P(female) for every item of ``ds``, streamed, computed in the
    precision the model was trained in."""
    dtype = model.compute_dtype
    model.eval()
    fused, per = [], {l: [] for l in model.layers}
    for batch, _ in DataLoader(ds, batch_size=batch_size, collate_fn=_collate):
        with _autocast(dtype):
            logits = {l: v.float() for l, v in model(batch).items()}
        fused.append(model.fuse(logits).numpy())
        for l in model.layers:
            per[l].append(torch.softmax(logits[l], 1)[:, 1].numpy())
    if not fused:
        return np.zeros(0), {l: np.zeros(0) for l in model.layers}
    return np.concatenate(fused), {l: np.concatenate(v) for l, v in per.items()}
