"""How well the SER model recognises emotions: unweighted average recall (UAR), the paper's metric."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def unweighted_average_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 4) -> float:
    """UAR: the mean of per-class recalls over the classes present in ``y_true``."""
    recalls = [np.mean(y_pred[y_true == c] == c) for c in range(n_classes) if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def recall_counts(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, n_classes: int = 4) -> list:
    """Per group (e.g. held-out speaker, in sorted order), per class: ``[rows of that class, of them
    recognised]``. UAR and its interval over groups follow from these alone
    (:func:`fed_ser.core.statistics.uar_interval`)."""
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    return [[[int(np.sum((groups == g) & (y_true == c))), int(np.sum((groups == g) & (y_true == c) & (y_pred == c)))]
             for c in range(n_classes)] for g in np.unique(groups)]


@torch.no_grad()
def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """Accuracy, UAR and mean cross-entropy of ``model`` on ``(X, y)`` (eval mode); with ``groups``
    (each row's speaker) also the per-speaker :func:`recall_counts` as ``counts``."""
    model.eval()
    logits = model(torch.as_tensor(X, dtype=torch.float32))
    yt = torch.as_tensor(y, dtype=torch.long)
    pred = logits.argmax(1).numpy()
    out = {
        "acc": float(np.mean(pred == y)),
        "uar": unweighted_average_recall(np.asarray(y), pred),
        "loss": float(nn.functional.cross_entropy(logits, yt)),
    }
    if groups is not None:
        out["counts"] = recall_counts(y, pred, groups, logits.shape[1])
    return out
