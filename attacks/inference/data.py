"""Attack data: recorded updates streamed from an update store, labelled with client gender.

The attack input of one update is, per SER layer ``l``, the weight update ``W_l`` (a one-channel
image) and the bias update ``b_l``: raw gradients for FedSGD, pseudo-gradients
``(theta - theta_k) / (lr * T)`` for FedAvg (see :meth:`fed_ser.recording.store.UpdateStore.attack_input`).
Each element is z-normalised with the mean/std of the *shadow* updates, computed in one
streaming pass, so memory does not grow with the number of updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fed_ser.recording.store import UpdateInfo, UpdateStore


@dataclass
class LayerStats:
    """Per-element mean and std of one array over the shadow updates."""

    mean: np.ndarray
    std: np.ndarray


def shadow_stats(store: UpdateStore, updates: list[UpdateInfo], layers: list[str]) -> dict[str, LayerStats]:
    """Streaming per-element mean/std (Welford) of the arrays of ``layers`` over ``updates``."""
    count = 0
    mean: dict[str, np.ndarray] = {}
    m2: dict[str, np.ndarray] = {}
    for info in updates:
        arrays = _pick(store.attack_input(info), layers)
        count += 1
        for k, a in arrays.items():
            a = a.astype(np.float64)
            if k not in mean:
                mean[k], m2[k] = np.zeros_like(a), np.zeros_like(a)
            d = a - mean[k]
            mean[k] += d / count
            m2[k] += d * (a - mean[k])
    if count == 0:
        raise ValueError("no updates to compute attack normalisation statistics from")
    return {k: LayerStats(mean[k].astype(np.float32), np.sqrt(m2[k] / max(count - 1, 1)).astype(np.float32) + 1e-8) for k in mean}


def _pick(arrays: dict[str, np.ndarray], layers: list[str]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k.split(".")[0] in layers}


class UpdateDataset(Dataset):
    """Items ``({layer: (weight image, bias)}, label)`` read lazily from the store."""

    def __init__(self, store: UpdateStore, updates: list[UpdateInfo], labels: np.ndarray,
                 layers: list[str], stats: dict[str, LayerStats]):
        if len(updates) != len(labels):
            raise ValueError("one label per update is required")
        self.store, self.updates, self.labels, self.layers, self.stats = store, updates, labels, layers, stats

    def __len__(self) -> int:
        return len(self.updates)

    def __getitem__(self, i: int):
        arrays = _pick(self.store.attack_input(self.updates[i]), self.layers)
        item = {}
        for layer in self.layers:
            w = arrays[f"{layer}.weight"]
            b = arrays[f"{layer}.bias"]
            sw, sb = self.stats[f"{layer}.weight"], self.stats[f"{layer}.bias"]
            item[layer] = (torch.from_numpy((w - sw.mean) / sw.std)[None], torch.from_numpy((b - sb.mean) / sb.std))
        return item, int(self.labels[i])


def labelled_updates(store: UpdateStore, client_gender: np.ndarray) -> tuple[list[UpdateInfo], np.ndarray]:
    """Client updates of ``store`` and their labels (1 = female) via the client id.

    Ground truth is joined here, from the prepared data set's client table; it never travelled
    with the update.
    """
    ups = store.updates()
    bad = [u.client for u in ups if not 0 <= u.client < len(client_gender)]
    if bad:
        raise ValueError(f"{store.path}: updates from clients {sorted(set(bad))[:5]} have no ground truth")
    return ups, np.array([1 if client_gender[u.client] == "F" else 0 for u in ups], dtype=np.int64)
