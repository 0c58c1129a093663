"""Reading audio with checks that name the offending file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

EXPECTED_RATE = 16_000


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the reason."""


def read_audio(path: str | Path, expected_rate: int = EXPECTED_RATE) -> np.ndarray:
    """Return the mono float32 waveform of ``path``; raise :class:`AudioError` if unusable.

    Checks: the file decodes, is not empty, has the expected sample rate (no silent
    resampling: a wrong rate usually means the wrong file), and holds finite samples.
    Multi-channel audio is averaged to mono.
    """
    path = Path(path)
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    if rate != expected_rate:
        raise AudioError(f"{path}: sample rate {rate} Hz, expected {expected_rate} Hz")
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    wave = wave.mean(axis=1)
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return wave
