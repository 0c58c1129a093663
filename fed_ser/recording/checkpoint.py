"""The global model after a finished round: ``<out_dir>/checkpoint.npz``, one format for every engine.

The Flower ServerApp writes it after each round (and resumes from it); the in-process engine
writes it at the end. Besides the parameters it holds the round, the settings' fingerprint (a run
never resumes from, or overwrites, a checkpoint of different settings) and the run's history up to
that round, so a run resumed after a crash continues its history instead of forgetting it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fed_ser.core.model import SERModel, build_model
from fed_ser.io import atomic_save_npz
from fed_ser.run.settings import ConfigError, RunSettings

NAME = "checkpoint.npz"


class CheckpointMismatch(ConfigError, RuntimeError):
    """A checkpoint written under other settings: one line naming the differing keys (a ConfigError for
    the console scripts; a RuntimeError, as it was, for callers that catch that)."""


def fingerprint(s: RunSettings) -> str:
    """What must match for a checkpoint to be resumed: everything but rounds, paths and flags."""
    cfg = s.to_run_config()
    for key in ("fl.rounds", "out_dir", "resume", "recorder.dir", "recorder.overwrite", "fl.eval_every", "fl.eval_fraction", "fl.round_timeout",
                "fl.poll_interval"):
        cfg.pop(key)
    if s.adv_mix == 0:  # adversarial-training knobs mean nothing while it is off (and older checkpoints lack them)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("adv.")}
    cfg["data.prepared"] = Path(s.prepared).name  # content-hashed name; the folder may move
    return json.dumps(cfg, sort_keys=True)


def save_checkpoint(path: str | Path, rnd: int, s: RunSettings, params: dict[str, np.ndarray],
                    history: list[dict] | None = None) -> None:
    """Write the global ``params`` after round ``rnd``, with the history so far, atomically."""
    atomic_save_npz(path, __round__=np.array(rnd), __fingerprint__=np.array(fingerprint(s)),
                    __history__=np.array(json.dumps(history or [])), **params)


def checkpoint_history(path: str | Path) -> list[dict]:
    """The per-round history saved with a checkpoint (empty for checkpoints written without one)."""
    with np.load(path) as z:
        return json.loads(str(z["__history__"])) if "__history__" in z.files else []


def load_checkpoint(path: str | Path, s: RunSettings | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """``(round, params)`` of a checkpoint; with ``s``, refuse one written under other settings."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint (has the run finished a round?)")
    with np.load(path) as z:
        if s is not None and str(z["__fingerprint__"]) != fingerprint(s):
            theirs, ours = json.loads(str(z["__fingerprint__"])), json.loads(fingerprint(s))
            differ = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now"
                               for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
            raise CheckpointMismatch(
                f"resume: {path.parent} holds a run with different settings ({differ}); refusing to resume or overwrite it. "
                "Choose another out_dir, or set resume=false to start over there.")
        return int(z["__round__"]), {k: z[k] for k in z.files if not k.startswith("__")}


def load_model(out_dir: str | Path, s: RunSettings) -> SERModel:
    """The trained global model of the finished run in ``out_dir`` (eval mode)."""
    _, params = load_checkpoint(Path(out_dir) / NAME, s)
    model = build_model(params["dense1.weight"].shape[1], s.dropout, s.seed)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    return model.eval()
