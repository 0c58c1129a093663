"""One FL run's :class:`~fed_ser.run.settings.RunSettings` from a composed Hydra config.

The Hydra config is nested (``cfg.fl.lr``), Flower's run config flat (``"fl.lr"``); both use the keys
:class:`RunSettings` declares, so the settings are read key by key from the config. Every entry point
that starts a run (``fed-ser-train``, the attack's shadow and private runs, ``fed-ser-deploy``) goes
through :func:`run_settings`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fed_ser.run.settings import RunSettings


def run_settings(cfg: DictConfig, prepared: str | Path, out_dir: str, recorder_dir: str = "") -> RunSettings:
    """The flat run settings of one FL run from the Hydra config, read key by key with the run-config keys
    (:attr:`RunSettings._KEYS`, the one list of them): what ``flwr run --run-config`` and ``pyproject.toml``
    name ``fl.lr`` is ``cfg.fl.lr`` here (the groups' schema gives every key its dataclass default).
    The caller gives the paths."""
    given = {"data.prepared": str(prepared), "out_dir": out_dir, "recorder.dir": recorder_dir}
    flat = {}
    for key in RunSettings._KEYS.values():
        value = given[key] if key in given else OmegaConf.select(cfg, key, default=None)
        if value is not None:
            flat[key] = value
    return RunSettings.from_run_config(flat)
