"""Server-side aggregation: one function for the Flower strategy and the in-process engines.

FedSGD: ``theta <- theta - lr * sum_k (n_k / N) g_k``; FedAvg: ``theta <- sum_k (n_k / N) theta_k``.
The weights are the clients' training sample counts ``n_k``. The mean is Flower's weighted average
(``flwr.serverapp.strategy``'s ``aggregate_arrayrecords``) operation for operation: each update
times ``n_k / N`` in float32, added in the clients' order; so the strategy, which aggregates with
:func:`aggregate`, moves the global model exactly as Flower's FedAvg would (a test checks it
bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_k (w_k / sum w) u_k``, accumulated in the updates' dtype in the order given."""
    if not updates:
        raise ValueError("aggregate: no client updates to aggregate")
    total = float(sum(weights))
    mean: dict[str, np.ndarray] = {}
    for update, w in zip(updates, weights, strict=True):
        factor = float(w) / total  # a Python float: the product keeps the update's dtype
        for k, v in update.items():
            if k in mean:
                mean[k] += v * factor
            else:
                mean[k] = v * factor
    return mean


def server_step(theta: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], algorithm: str, lr: float) -> dict[str, np.ndarray]:
    """New global parameters from the sample-weighted mean of the client replies.

    ``algorithm="fedsgd"``: the replies are gradients, ``theta - lr * mean``; ``"fedavg"``: the replies
    are models (FedAvg's, or FedSGD's one-step models under Flower's DP), the mean as is.
    """
    if algorithm == "fedsgd":
        return {k: (theta[k] - lr * mean[k]).astype(np.float32) for k in theta}
    return {k: np.asarray(mean[k], dtype=np.float32) for k in theta}


def aggregate(theta: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
              algorithm: str, lr: float) -> dict[str, np.ndarray]:
    """The next global model: :func:`weighted_mean` of the replies (weights ``n_k``), then :func:`server_step`."""
    return server_step(theta, weighted_mean(updates, weights), algorithm, lr)
