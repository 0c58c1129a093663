"""A rerun never drops recorded updates silently.

A run that starts at round ``start`` (0, or the round of the checkpoint it resumes) drops the store's
records of later rounds. Records of an unfinished round are the ones a resume redoes anyway: the store's
last round, unless the checkpoint says it finished. Records of any finished round are data; a run that
would drop them is refused, naming how many and which rounds, unless ``recorder.overwrite=true``.
Every engine checks before it starts (:func:`check_overwrite`); the ServerApp checks again where it opens
the store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fed_ser.recording.checkpoint import NAME as CHECKPOINT
from fed_ser.recording.checkpoint import load_checkpoint
from fed_ser.recording.store import UpdateStore
from fed_ser.run.settings import ConfigError, RunSettings


def start_round(s: RunSettings) -> int:
    """The round a run of ``s`` starts after: the checkpoint's when it resumes one, else 0."""
    ckpt = Path(s.out_dir) / CHECKPOINT if s.out_dir else None
    if s.resume and ckpt is not None and ckpt.exists():
        return load_checkpoint(ckpt, s)[0]
    return 0


def _checkpoint_round(s: RunSettings) -> int:
    """The last round the run in ``s.out_dir`` finished, by its checkpoint (whatever its settings), else 0."""
    ckpt = Path(s.out_dir) / CHECKPOINT if s.out_dir else None
    if ckpt is None or not ckpt.exists():
        return 0
    try:
        with np.load(ckpt) as z:
            return int(z["__round__"])
    except (OSError, ValueError, KeyError):
        return 0


def finished_records_dropped(store: UpdateStore, start: int, finished: int) -> list:
    """The records a run starting after round ``start`` would drop although their round finished (a round
    before the store's last, or one the checkpoint says is done: ``finished``)."""
    if not store.records:
        return []
    last = max(r.round for r in store.records)
    return [r for r in store.records if r.round > start and (r.round < last or r.round <= finished)]


def check_overwrite(s: RunSettings, start: int | None = None) -> None:
    """Refuse (:class:`ConfigError` naming ``recorder.overwrite``) a run of ``s`` that would drop recorded
    updates of finished rounds from ``s.recorder_dir``, unless ``s.recorder_overwrite``. Without ``start``, the
    checkpoint a resumed run would start from is checked too (one of other settings raises
    :class:`~fed_ser.recording.checkpoint.CheckpointMismatch`)."""
    start = start_round(s) if start is None else start
    if not s.recorder_dir or s.recorder_overwrite or not (Path(s.recorder_dir) / "updates.bin").exists():
        return
    store = UpdateStore(s.recorder_dir)
    try:
        lost = finished_records_dropped(store, start, _checkpoint_round(s))
    finally:
        store.close()
    if lost:
        rounds = sorted({r.round for r in lost})
        why = "resume=false" if not s.resume else f"the run starts after round {start}"
        raise ConfigError(
            f"recorder.overwrite: {s.recorder_dir} holds {len(lost)} recorded records of finished rounds "
            f"{rounds[0]}-{rounds[-1]} that this run would drop ({why}); set recorder.overwrite=true (or --overwrite) "
            "to replace them, or choose another out_dir")
