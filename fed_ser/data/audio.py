"""Reading audio with checks that name the offending file."""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

#: Below this rate an utterance cannot carry the 0-4 kHz band the features describe; such a file is
#: almost always a mistake (a telephone-band or corrupt header), so it is refused, not resampled.
MIN_RATE = 8_000


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the reason."""


def read_audio(path: str | Path, min_rate: int = MIN_RATE) -> tuple[np.ndarray, int]:
    """Return ``(mono float32 waveform, sample rate)`` of ``path``; raise :class:`AudioError` if unusable.

    Any sample rate from ``min_rate`` up and any channel count are accepted: channels are averaged
    to mono, and each feature extractor takes the native rate (Emo-Base as it is; the s3prl
    upstreams resample to 16 kHz). Checks: the file decodes, is not empty, holds finite samples.
    """
    path = Path(path)
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"{path}: cannot decode audio ({exc})") from exc
    if rate < min_rate:
        raise AudioError(f"{path}: sample rate {rate} Hz is below {min_rate} Hz")
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    wave = wave.mean(axis=1)
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return wave, int(rate)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` at ``target`` Hz (polyphase filter; unchanged if the rates already agree)."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(wave, target // g, rate // g).astype(np.float32)
