"""How well the SER model recognises emotions: unweighted average recall (UAR), the paper's metric."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def unweighted_average_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 4) -> float:
    """UAR: the mean of per-class recalls over the classes present in ``y_true``."""
    recalls = [np.mean(y_pred[y_true == c] == c) for c in range(n_classes) if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, UAR and mean cross-entropy of ``model`` on ``(X, y)`` (eval mode)."""
    model.eval()
    logits = model(torch.as_tensor(X, dtype=torch.float32))
    yt = torch.as_tensor(y, dtype=torch.long)
    pred = logits.argmax(1).numpy()
    return {
        "acc": float(np.mean(pred == y)),
        "uar": unweighted_average_recall(np.asarray(y), pred),
        "loss": float(nn.functional.cross_entropy(logits, yt)),
    }
