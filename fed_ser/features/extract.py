"""Per-utterance feature extraction with a content-keyed on-disk cache.

One vector per utterance, cached under ``<cache>/<feature set>-<version>/<hh>/<sha256>.npy``
where the hash is of the audio file's bytes: renaming or moving a corpus keeps its cache, and
changing the audio or the extractor version invalidates it. Every cache file is written
atomically. Extraction runs in worker processes with a progress bar; a file that fails (corrupt
audio, wrong rate, NaN features) is reported with its path and the rest of the batch completes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from fed_ser.data.audio import AudioError, read_audio
from fed_ser.io import atomic_save_npy


class FeatureExtractor(Protocol):
    """Maps a mono waveform at its native sample rate to one feature vector."""

    name: str
    version: str
    dim: int

    def __call__(self, wave: np.ndarray, rate: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Failure:
    """An utterance whose features could not be computed."""

    path: str
    reason: str


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the cache key's content part)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_path(cache_dir: str | Path, extractor: FeatureExtractor, digest: str) -> Path:
    """Where the vector for audio ``digest`` under ``extractor`` lives."""
    return Path(cache_dir) / f"{extractor.name}-{extractor.version}" / digest[:2] / f"{digest}.npy"


# One extractor per factory per process (openSMILE objects are costly to build). Keyed by the
# factory so a process that has used several extractors never hands one's object to another.
_WORKER: dict[Callable[[], FeatureExtractor], FeatureExtractor] = {}


def _extract_one(args: tuple[str, str, Callable[[], FeatureExtractor]]) -> tuple[str, np.ndarray | None, str]:
    path, cache_dir, factory = args
    ex = _WORKER.get(factory)
    if ex is None:
        ex = _WORKER[factory] = factory()
    try:
        digest = file_digest(path)
    except OSError as exc:
        return path, None, f"cannot read file ({exc})"
    target = cache_path(cache_dir, ex, digest)
    if target.exists():
        try:
            return path, np.load(target), ""
        except (OSError, ValueError):
            pass  # unreadable cache entry: recompute and replace it atomically
    try:
        wave, rate = read_audio(path)
        vec = np.asarray(ex(wave, rate), dtype=np.float32).reshape(-1)
    except AudioError as exc:
        return path, None, str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # an extractor crash on one file must not stop the batch
        return path, None, f"{ex.name} failed: {type(exc).__name__}: {exc}"
    if vec.shape != (ex.dim,):
        return path, None, f"{ex.name} returned shape {vec.shape}, expected ({ex.dim},)"
    if not np.all(np.isfinite(vec)):
        bad = np.flatnonzero(~np.isfinite(vec))[:5].tolist()
        return path, None, f"{ex.name} produced NaN/inf features (dims {bad}...)"
    atomic_save_npy(target, vec)
    return path, vec, ""


def extract_features(
    paths: list[str],
    factory: Callable[[], FeatureExtractor],
    cache_dir: str | Path,
    workers: int | None = None,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray, list[Failure]]:
    """Extract (or load cached) features for ``paths``.

    Returns ``(X, ok, failures)``: ``X[i]`` is the vector of ``paths[i]`` (zeros where it
    failed), ``ok[i]`` says whether it succeeded, ``failures`` names each failed file.
    ``factory`` builds the extractor inside each worker (openSMILE objects do not pickle).
    """
    probe = factory()
    X = np.zeros((len(paths), probe.dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    failures: list[Failure] = []
    index = {p: i for i, p in enumerate(paths)}
    jobs = [(p, str(cache_dir), factory) for p in paths]
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    bar = tqdm(total=len(paths), desc=desc, unit="utt", mininterval=5.0)
    if workers == 1:
        _WORKER[factory] = probe
        results = map(_extract_one, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_extract_one, jobs, chunksize=32)
    try:
        for path, vec, reason in results:
            bar.update(1)
            if vec is None:
                failures.append(Failure(path, reason))
            else:
                X[index[path]] = vec
                ok[index[path]] = True
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    return X, ok, failures
