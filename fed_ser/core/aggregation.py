"""Server-side aggregation, one function for the Flower strategy and the in-process engines.

FedSGD: ``theta <- theta - lr * sum_k (n_k / N) g_k``; FedAvg: ``theta <- sum_k (n_k / N) theta_k``.
The weights are the clients' training sample counts ``n_k``, as Flower's weighted average uses them.
"""

from __future__ import annotations

import numpy as np


def server_step(theta: dict[str, np.ndarray], mean: dict[str, np.ndarray], algorithm: str, lr: float) -> dict[str, np.ndarray]:
    """New global parameters from the sample-weighted mean of the client updates.

    FedSGD: ``theta - lr * sum_k (n_k/N) g_k``; FedAvg: ``sum_k (n_k/N) theta_k`` as is.
    """
    if algorithm == "fedsgd":
        return {k: (theta[k] - lr * mean[k]).astype(np.float32) for k in theta}
    return {k: np.asarray(mean[k], dtype=np.float32) for k in theta}


def aggregate(theta: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], weights: list[float],
              algorithm: str, lr: float) -> dict[str, np.ndarray]:
    """Weighted mean of the updates (weights n_k / N), then :func:`server_step`."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return server_step(theta, {k: sum(wk * u[k] for wk, u in zip(w, updates)) for k in updates[0]}, algorithm, lr)
