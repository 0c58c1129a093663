"""Attack success rate (ASR), per layer and with several rounds pooled.

ASR as defined in the paper: for each private client, pick one of its updates at random from
the whole training run and predict its gender; repeat ``trials`` (10) times per client; ASR is
the mean over clients of the share of correct predictions. With ``pool_rounds = k > 1`` each
trial averages the predicted P(female) of k random updates of that client (from different
rounds), which is what an observer who keeps listening can do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def client_trials(clients: np.ndarray, labels: np.ndarray, trials: int = 10, pool_rounds: int = 1,
                  seed: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """The ASR trials: ``(client, true label, indices of k random updates of that client)``,
    ``trials`` per client; shared by every attack so their ASRs use the same draws."""
    if not len(clients) == len(labels):
        raise ValueError("clients and labels must align")
    if pool_rounds < 1 or trials < 1:
        raise ValueError("attack.pool_rounds and attack.trials must be >= 1")
    rng = np.random.default_rng(seed)
    for c in np.unique(clients):
        rows = np.flatnonzero(clients == c)
        for _ in range(trials):
            yield int(c), int(labels[rows[0]]), rng.choice(rows, size=pool_rounds, replace=len(rows) < pool_rounds)


def attack_success_rate(p_female: np.ndarray, clients: np.ndarray, labels: np.ndarray, trials: int = 10,
                        pool_rounds: int = 1, seed: int = 0) -> float:
    """ASR over clients; ``p_female[i]`` is the attack's output for update ``i`` of ``clients[i]``."""
    if len(p_female) != len(clients):
        raise ValueError("p_female, clients and labels must align")
    per_client: dict[int, list[int]] = {}
    for client, truth, pick in client_trials(clients, labels, trials, pool_rounds, seed):
        per_client.setdefault(client, []).append(int((p_female[pick].mean() > 0.5) == truth))
    return float(np.mean([np.mean(v) for v in per_client.values()])) if per_client else float("nan")
