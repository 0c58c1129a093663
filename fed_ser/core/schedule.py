"""Who trains when, and with which randomness: shared by every engine.

The Flower path, the in-process reference engine and the vectorised shadow engine draw client
selection and local-batch seeds from these two functions only, so that one seed gives the same
clients, the same mini-batches and the same dropout masks on every path (and a resumed run
continues with the selection it would have made without the interruption).
"""

from __future__ import annotations

import random
from functools import lru_cache


def federation_size(min_available: int, num_clients: int) -> int:
    """How many clients (client ids ``0..n-1``) the schedule draws from: ``fl.min_available`` when
    set, else every client of the data set. The server schedules with it and every client
    calibrates its DP noise with it, so the two always agree."""
    if min_available < 0 or min_available > num_clients:
        raise ValueError(f"fl.min_available: {min_available} is not in 0..{num_clients} (the data set's clients)")
    return min_available or num_clients


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The local-batch seed of client ``client`` in round ``rnd``."""
    return hash((seed, rnd, client)) % (2**31)


def is_eval_round(rnd: int, eval_every: int, rounds: int) -> bool:
    """Whether the global model is evaluated after round ``rnd``: every ``eval_every`` rounds and the last."""
    return rnd % eval_every == 0 or rnd == rounds


def clients_per_round(num_clients: int, fraction: float) -> int:
    """``int(fraction * N)`` clients a round, at least one (the paper's ``int(0.1 N)``)."""
    return max(int(num_clients * fraction), 1)


def select_clients(seed: int, rnd: int, num_clients: int, fraction: float) -> list[int]:
    """The client ids that train in round ``rnd``: a seeded sample without replacement.

    Stateless in ``rnd``, so it does not depend on how many rounds ran before in this process.
    """
    rng = random.Random(seed * 1_000_003 + rnd)  # int seeds: the same in every process
    return sorted(rng.sample(range(num_clients), clients_per_round(num_clients, fraction)))


@lru_cache(maxsize=64)
def participations(seed: int, rounds: int, num_clients: int, fraction: float) -> tuple[int, ...]:
    """How many of rounds ``1..rounds`` each client is selected for (index = client id).

    The schedule is fixed by the run's seed before training starts, so a client knows in advance
    how often it will be asked; DP-FedSGD calibrates each client's noise to this count.
    """
    counts = [0] * num_clients
    for rnd in range(1, rounds + 1):
        for client in select_clients(seed, rnd, num_clients, fraction):
            counts[client] += 1
    return tuple(counts)
