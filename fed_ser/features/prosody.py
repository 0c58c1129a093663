"""Prosody read off raw (un-normalised) Emo-Base functionals: how far speakers move their F0 and level
from their neutral speech in each emotion. The calibrated voice (:mod:`fed_ser.data.voice`) takes
its parameters from these measurements, and fed-ser-calibrate reports them for real and synthetic corpora.
"""

from __future__ import annotations

import numpy as np

from fed_ser.data.corpora import EMOTIONS

PROSODY = {"f0_semitones": ("F0env_sma_amean", lambda v: 12 * np.log2(np.maximum(v, 1.0))),
           "peak_db": ("pcm_intensity_sma_max", lambda v: 10 * np.log10(np.maximum(v, 1e-10)))}


def prosody_changes(emotion: np.ndarray, speaker: np.ndarray, gender: np.ndarray, X_raw: np.ndarray,
                    names: list[str]) -> dict:
    """Per gender and emotion: the mean over speakers of (emotion mean - neutral mean) of each
    :data:`PROSODY` measure, with its standard error over speakers; raw (un-normalised) Emo-Base rows."""
    out: dict = {}
    for measure, (feature, f) in PROSODY.items():
        v = f(X_raw[:, names.index(feature)])
        for g in ("F", "M"):
            per = []
            for s in np.unique(speaker[gender == g]):
                r = speaker == s
                if not (r & (emotion == "neutral")).any():
                    continue
                base = v[r & (emotion == "neutral")].mean()
                per.append([v[r & (emotion == e)].mean() - base if (r & (emotion == e)).any() else np.nan
                            for e in EMOTIONS])
            per = np.array(per, dtype=np.float64).reshape(-1, len(EMOTIONS))
            for i, e in enumerate(EMOTIONS):
                col = per[:, i][np.isfinite(per[:, i])]
                out.setdefault(measure, {}).setdefault(g, {})[e] = {
                    "mean": float(col.mean()) if len(col) else None,
                    "se": float(col.std() / np.sqrt(len(col))) if len(col) > 1 else None, "speakers": int(len(col))}
    return out
