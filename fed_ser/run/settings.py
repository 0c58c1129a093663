"""Run settings shared by the ServerApp and ClientApp, from Hydra or from Flower's run config.

Flower's run config is flat (``"fl.algorithm" = "fedsgd"``, values bool/int/float/str only), the
Hydra config is nested (``fl.algorithm=fedsgd``). :class:`RunSettings` is the one declaration of
both: each field names its key with :func:`setting`; :meth:`from_run_config` reads the flat keys,
:meth:`to_run_config` writes them, the Hydra CLI reads its config by the same keys, and Hydra's
schema for the run-config groups of ``conf/`` (``fl``, ``model``, ``recorder``, ``dp``, ``flower_dp``,
``adv``) is built from the fields' types and defaults (:mod:`fed_ser.experiments.config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

ALGORITHMS = ("fedsgd", "fedavg")
DP_MODES = {"none": None, "sample": "fedsgd", "user": "fedavg", "udp": "fedavg"}  # mode -> the algorithm it protects
DP_CALIBRATIONS = ("per_client", "expected")
#: Flower's own DP, used as shipped (:mod:`fed_ser.flower.privacy`): central DP with server-side fixed or
#: adaptive clipping, central DP with client-side fixed clipping (``fixedclipping_mod``), local DP (``LocalDpMod``).
FLOWER_DP_MODES = ("none", "central-fixed", "central-adaptive", "client-fixed", "local")
#: the SER model's layers the recorder can keep (:class:`fed_ser.core.model.SERModel`'s linear layers)
LAYERS = ("dense1", "dense2", "out")


class ConfigError(ValueError):
    """A wrong configuration value; the message names the key."""


_REQUIRED = object()


def setting(key: str, default: Any = _REQUIRED) -> Any:
    """A :class:`RunSettings` field and its flat run-config ``key`` (``"fl.lr"``): the one place a run
    setting is declared. The run-config keys, Hydra's schema for ``conf/`` (:mod:`fed_ser.experiments.config`)
    and the checks on ``pyproject.toml``'s ``[tool.flwr.app.config]`` (tests/test_config.py) come from here."""
    if default is _REQUIRED:
        return field(metadata={"key": key})
    return field(default=default, metadata={"key": key})


@dataclass(frozen=True)
class RunSettings:
    """Everything one FL run needs, typed and checked: each field's :func:`setting` names its run-config key."""

    prepared: str = setting("data.prepared")  # path of the prepared FederatedData .npz
    algorithm: str = setting("fl.algorithm", "fedsgd")
    rounds: int = setting("fl.rounds", 200)
    fraction: float = setting("fl.fraction", 0.1)
    lr: float = setting("fl.lr", 0.1)  # FedSGD: server step size; FedAvg: client learning rate
    local_epochs: int = setting("fl.local_epochs", 1)
    batch_size: int = setting("fl.batch_size", 20)
    optimizer: str = setting("fl.optimizer", "sgd")  # FedAvg clients' optimiser (fl=fedavg: adam, as the paper's code)
    dropout: float = setting("model.dropout", 0.2)
    eval_every: int = setting("fl.eval_every", 20)
    eval_fraction: float = setting("fl.eval_fraction", 1.0)
    min_available: int = setting("fl.min_available", 0)  # 0: wait for every client of the data set
    round_timeout: float = setting("fl.round_timeout", 600.0)  # seconds a round waits for replies (a dead node's reply never comes)
    poll_interval: float = setting("fl.poll_interval", 0.05)  # seconds between the ServerApp's checks for replies (Flower's deployed grid: 3 s)
    secagg: bool = setting("fl.secagg", False)  # SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod): the server sees each round's sum only
    recorder_dir: str = setting("recorder.dir", "")  # empty: no recording
    recorder_layers: str = setting("recorder.layers", "all")  # "all" or comma-separated layer names, e.g. "dense1"
    recorder_float16: bool = setting("recorder.float16", False)
    recorder_overwrite: bool = setting("recorder.overwrite", False)  # a rerun may drop the records of finished rounds in recorder.dir
    out_dir: str = setting("out_dir", "")
    resume: bool = setting("resume", True)
    seed: int = setting("seed", 0)
    dp_mode: str = setting("dp.mode", "none")  # none | sample (DP-FedSGD, Opacus) | user (user-level DP, FedAvg) | udp (as published)
    dp_epsilon: float = setting("dp.epsilon", 10.0)
    dp_delta: float = setting("dp.delta", 1e-5)
    dp_clip: float = setting("dp.clip", 1.0)
    dp_calibrate: str = setting("dp.calibrate", "per_client")  # DP-FedSGD noise for: per_client (its scheduled steps) | expected
    flower_dp_mode: str = setting("flower_dp.mode", "none")  # one of FLOWER_DP_MODES (Flower's DP wrappers and mods, as shipped)
    flower_dp_noise: float = setting("flower_dp.noise_multiplier", 1.0)  # central modes: noise multiplier (std sigma * clip on the sum of the round's updates)
    flower_dp_clip: float = setting("flower_dp.clip", 1.0)  # clipping norm of a client's model update (central-adaptive: the initial norm)
    flower_dp_epsilon: float = setting("flower_dp.epsilon", 10.0)  # local: LocalDpMod's epsilon per release
    flower_dp_delta: float = setting("flower_dp.delta", 1e-5)  # local: LocalDpMod's delta per release; every mode: the delta epsilon is reported at
    adv_mix: float = setting("adv.mix", 0.0)  # federated adversarial training: share of each batch made adversarial (0: off)
    adv_method: str = setting("adv.method", "pgd")  # fgsm | pgd
    adv_norm: str = setting("adv.norm", "linf")  # linf | l2
    adv_epsilon: float = setting("adv.epsilon", 0.1)
    adv_steps: int = setting("adv.steps", 5)
    adv_step_size: float = setting("adv.step_size", 0.0)  # 0: 2.5 * epsilon / steps

    _KEYS: ClassVar[dict[str, str]]  # field name -> run-config key, from each field's setting() (below the class)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"fl.algorithm: {self.algorithm!r} is not one of {ALGORITHMS}")
        if self.rounds < 1:
            raise ConfigError(f"fl.rounds: must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fl.fraction: must be in (0, 1], got {self.fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"fl.lr: must be a finite number > 0, got {self.lr}")
        if not 0.0 < self.eval_fraction <= 1.0:
            raise ConfigError(f"fl.eval_fraction: must be in (0, 1] (the share of nodes that evaluate), got {self.eval_fraction}")
        if self.min_available < 0:
            raise ConfigError(f"fl.min_available: must be >= 0 (0: every client of the data set), got {self.min_available}")
        unknown = sorted(set(self.layers() or ()) - set(LAYERS))
        if unknown:
            raise ConfigError(f"recorder.layers: {unknown} not among the model's layers {list(LAYERS)} (or 'all')")
        if self.batch_size < 1 or self.local_epochs < 1:
            raise ConfigError("fl.batch_size and fl.local_epochs must be >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"fl.optimizer: {self.optimizer!r} is not 'sgd' or 'adam'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if not self.round_timeout > 0:
            raise ConfigError(f"fl.round_timeout: must be > 0 seconds, got {self.round_timeout}")
        if not 0.0 < self.poll_interval <= self.round_timeout:
            raise ConfigError(f"fl.poll_interval: must be > 0 seconds and at most fl.round_timeout, got {self.poll_interval}")
        if self.eval_every < 1:
            raise ConfigError(f"fl.eval_every: must be >= 1, got {self.eval_every}")
        if self.dp_mode not in DP_MODES:
            raise ConfigError(f"dp.mode: {self.dp_mode!r} is not one of {sorted(DP_MODES)}")
        if self.dp_calibrate not in DP_CALIBRATIONS:
            raise ConfigError(f"dp.calibrate: {self.dp_calibrate!r} is not one of {DP_CALIBRATIONS}")
        if self.dp_mode != "none":
            if DP_MODES[self.dp_mode] != self.algorithm:
                raise ConfigError(f"dp.mode={self.dp_mode} protects fl.algorithm={DP_MODES[self.dp_mode]}, "
                                  f"not {self.algorithm} (use dp.mode=sample with fedsgd, dp.mode=user or udp with fedavg)")
            try:
                self.privacy()
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if self.flower_dp_mode not in FLOWER_DP_MODES:
            raise ConfigError(f"flower_dp.mode: {self.flower_dp_mode!r} is not one of {FLOWER_DP_MODES}")
        if self.flower_dp_mode != "none":
            if self.dp_mode != "none":
                raise ConfigError(f"flower_dp.mode={self.flower_dp_mode} and dp.mode={self.dp_mode}: choose one DP mechanism")
            if not self.flower_dp_clip > 0:
                raise ConfigError(f"flower_dp.clip: must be > 0, got {self.flower_dp_clip}")
            if not self.flower_dp_noise > 0 and self.flower_dp_mode != "local":
                raise ConfigError(f"flower_dp.noise_multiplier: must be > 0, got {self.flower_dp_noise}")
            if not self.flower_dp_epsilon > 0:
                raise ConfigError(f"flower_dp.epsilon: must be > 0, got {self.flower_dp_epsilon}")
            if not 0.0 < self.flower_dp_delta < 1.0:
                raise ConfigError(f"flower_dp.delta: must be in (0, 1), got {self.flower_dp_delta}")
        if self.secagg and self.flower_dp_mode in ("central-fixed", "central-adaptive"):
            raise ConfigError(f"fl.secagg=true and flower_dp.mode={self.flower_dp_mode}: server-side clipping needs each "
                              "update, which SecAgg+ hides; with SecAgg+ use flower_dp.mode=client_fixed or local")
        try:
            self.adversarial_training()
        except ValueError as exc:
            raise ConfigError(str(exc).replace("attack.", "adv.")) from exc

    def adversarial_training(self):
        """:class:`defenses.evasion.adversarial_training.AdversarialTrainingConfig` when ``adv.mix > 0``, else None."""
        from attacks.evasion.adversarial import PerturbationConfig
        from defenses.evasion.adversarial_training import AdversarialTrainingConfig

        attack = PerturbationConfig(self.adv_method, self.adv_norm, self.adv_epsilon, self.adv_steps, self.adv_step_size)
        cfg = AdversarialTrainingConfig(self.adv_mix, attack)
        return cfg if self.adv_mix > 0 else None

    def privacy(self):
        """The defence's config (DP-FedSGD's, user-level DP's or UDP's), or None."""
        if self.dp_mode == "sample":
            from defenses.privacy.dp_fedsgd import DPConfig

            return DPConfig(self.dp_epsilon, self.dp_delta, self.dp_clip)
        if self.dp_mode == "user":
            from defenses.privacy.user_dp import UserDPConfig

            return UserDPConfig(self.dp_epsilon, self.dp_delta, self.dp_clip)
        if self.dp_mode == "udp":
            from defenses.privacy.udp import UDPConfig

            return UDPConfig(self.dp_epsilon, self.dp_delta, self.dp_clip)
        return None

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RunSettings:
        """Read Flower's flat run config; unknown keys are an error naming them."""
        inverse = {v: k for k, v in cls._KEYS.items()}
        unknown = sorted(set(cfg) - set(inverse))
        if unknown:
            raise ConfigError(f"unknown run-config keys {unknown}; known: {sorted(inverse)}")
        types = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for key, value in cfg.items():
            name = inverse[key]
            kwargs[name] = _coerce(value, types[name], key)
        if not kwargs.get("prepared"):
            raise ConfigError("data.prepared: empty; prepare a data set with `fed-ser-prepare dataset=crema_d` and pass "
                              "the path it prints: flwr run . --run-config \"data.prepared='PATH'\"")
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        return {self._KEYS[k]: v for k, v in asdict(self).items()}

    @property
    def model_replies(self) -> bool:
        """Whether clients reply with model parameters: FedAvg always; FedSGD under Flower's DP, whose
        wrappers and mods clip ``reply - global`` (the one-step model ``theta - lr g`` carries the
        gradient, and its plain mean is FedSGD's server step), and under SecAgg+, whose sum is a weighted mean."""
        return self.algorithm == "fedavg" or self.flower_dp_mode != "none" or self.secagg

    def layers(self) -> list[str] | None:
        return None if self.recorder_layers in ("", "all") else [x.strip() for x in self.recorder_layers.split(",")]


RunSettings._KEYS = {f.name: f.metadata["key"] for f in fields(RunSettings)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    t = {"str": str, "int": int, "float": float, "bool": bool}.get(str(typ), typ)
    if t is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"{key}: expected a boolean, got {value!r}")
            return value.lower() == "true"
        return bool(value)
    try:
        return t(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {value!r} as {t.__name__}") from exc
