"""Z-normalisation of the features: (x - mean) / (std + 1e-5) with whose statistics ``features.norm`` says.

``speaker`` (the paper's): each speaker's statistics over all of its utterances, every shard and
validation row included: a step no single device could take when a speaker's utterances are cut
into several clients, and one the attacker's virtual clients then reproduce exactly. ``client``:
each client's own shard, as a device would. ``none``: the features as extracted.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def speaker_znorm(X: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Normalise every speaker's rows with that speaker's own mean and std.

    Test speakers are normalised with their own statistics too (an utterance set per speaker
    is available at test time in the paper's protocol). Raises on NaN input, naming the rows.
    """
    X = np.asarray(X, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise ValueError(f"features contain NaN/inf in rows {bad[:10].tolist()} (speakers {sorted(set(np.asarray(speakers)[bad].tolist()))[:5]})")
    out = np.empty_like(X)
    for s in np.unique(speakers):
        rows = speakers == s
        out[rows] = (X[rows] - X[rows].mean(axis=0)) / (X[rows].std(axis=0) + EPS)
    return out.astype(np.float32)


#: ``features.norm``: whose statistics z-normalise a row.
NORMS = ("speaker", "client", "none")


def check_norm(norm: str) -> str:
    """``norm`` if it is one of :data:`NORMS`; a ValueError naming the key otherwise."""
    if norm not in NORMS:
        raise ValueError(f"features.norm: {norm!r} is not one of {NORMS}")
    return norm


def client_znorm(X: np.ndarray, client: np.ndarray, speaker: np.ndarray) -> np.ndarray:
    """``features.norm=client``: every client z-normalises its own shard (all its rows, training and
    validation) with its own mean and std, as a device holding only its shard would; rows of no client
    (held-out test speakers) are normalised per speaker, as a device of that speaker would."""
    X = np.asarray(X, dtype=np.float64)
    group = np.where(np.asarray(client) >= 0, np.char.add("client:", np.asarray(client).astype(str)),
                     np.char.add("speaker:", np.asarray(speaker).astype(str)))
    return speaker_znorm(X, group)
