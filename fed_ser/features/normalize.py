"""Per-speaker z-normalisation, as in the paper: (x - mean_s) / (std_s + 1e-5)."""

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
