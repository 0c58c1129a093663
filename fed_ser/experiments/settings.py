"""The experiment's settings groups, declared once: ``data``, ``features``, ``shadow`` (and, from
:mod:`attacks.inference.settings`, ``attack``), each a dataclass of its keys' types, defaults and checks.

Each dataclass is Hydra's structured schema of its group (:mod:`fed_ser.experiments.config` registers
``data/schema``, ``features/schema``, ``features/s3prl_schema``, ``shadow/schema`` and
``attack/schema``): the yaml of ``conf/`` says only what makes an option that option, every default
lives here, and Hydra refuses an unknown key or a value of the wrong type, naming the key. Values of
the right type that make no sense are refused by the dataclass's ``__post_init__``, one line naming
the key; :func:`check_groups` reads every group a composed config holds, so
:func:`~fed_ser.experiments.config.load_config` stops on them before any entry point prepares or
writes anything. The code reads a group typed through :func:`attack_settings`, :func:`shadow_settings`,
:func:`data_settings` and :func:`features_settings`.

The ``size`` options (``conf/size/``) are presets of other groups' keys (``data.scale``,
``fl.rounds``, ``folds``, ``attack.max_updates``, ``attack.max_epochs``), typed and checked by those
groups' declarations and by :class:`ExperimentSettings` (the experiment's own top-level keys).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from omegaconf import DictConfig

from attacks.inference.settings import AttackSettings
from fed_ser.core.settings import read_settings
from fed_ser.data.corpora import LOADERS
from fed_ser.data.voice import DEFAULT_GENDER_STYLE, check_voice
from fed_ser.features.normalize import NORMS
from fed_ser.run.settings import LAYERS, ConfigError

T = TypeVar("T")

#: ``shadow.mode``: where the attacker's shadow federations' data come from (:mod:`fed_ser.experiments.threat_model`)
SHADOW_MODES = ("corpora", "speakers", "synthetic")
#: ``private_engine`` and ``shadow.engine``: Flower's simulation, or the in-process vectorised engine
ENGINES = ("flower", "vectorised")
#: ``data.voice`` asking for a voice calibrated on this real corpus (:func:`fed_ser.experiments.prepare.resolve_voice`)
CALIBRATED_ON = "emodb"


@dataclass
class DataRoots:
    """``data.roots``: a real corpus in its published layout; null: its synthetic twin is generated."""

    iemocap: str | None = None  # IEMOCAP_full_release: Session1..5/
    crema_d: str | None = None  # CREMA-D: AudioWAV/ + VideoDemographics.csv
    msp_improv: str | None = None  # MSP-IMPROV: Evaluation.txt + session1..6/
    emodb: str | None = None  # EmoDB: SSTTTEV.wav, flat or under wav/
    ravdess: str | None = None  # RAVDESS: Actor_01..24/
    manifest: str | None = None  # your recordings: a CSV (or a folder with manifest.csv) of path,speaker,gender,emotion[,session]


@dataclass
class ManifestSettings:
    """``data.manifest``: how a corpus listed in a CSV (``dataset=manifest``) is read."""

    # manifest labels -> neutral/happy/sad/angry, e.g. {joy: happy, fear: null} (null: the label's recordings are left out).
    # A dict of str -> str or null, checked below: OmegaConf 2.3 cannot override a null typed dict from the command line
    emotion_map: Any = None
    allow_outside: bool = False  # true: the manifest may list recordings outside its own folder (.., absolute paths, links)

    def __post_init__(self) -> None:
        if self.emotion_map is None:
            return
        if not isinstance(self.emotion_map, Mapping) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in self.emotion_map.items()):
            raise ValueError(f"data.manifest.emotion_map: a mapping of manifest labels to emotions (or null), "
                             f"got {self.emotion_map!r}")
        self.emotion_map = dict(self.emotion_map)


@dataclass
class DataSettings:
    """``data``: where the corpora come from, the synthetic corpora's knobs, and where features and prepared data go."""

    synthetic: bool = True  # generate every corpus whose root is not set; false: every corpus used must be real
    # synthetic corpora: <root>/<corpus>, one folder per scale, seed, style and voice
    root: str = "data/synthetic/scale${data.scale}-seed${data.seed}-style${data.gender_style}${voice_dir:${data.voice}}"
    roots: DataRoots = field(default_factory=DataRoots)
    manifest: ManifestSettings = field(default_factory=ManifestSettings)
    scale: float = 1.0  # utterances per speaker relative to the real corpora
    seed: int = 0
    # synthetic only: strength of the gender-by-emotion expression style (0: no explicit style; F0 still leaves a weaker cue)
    gender_style: float = DEFAULT_GENDER_STYLE
    # synthetic only: designed (fed-ser's first voice) | emodb (F0 and level calibrated against EmoDB; its
    # style is as measured at gender_style=1.0) | a calibrated spec 'f0:F=...;M=...'
    voice: str = "designed"
    cache: str = ".cache/features"  # content-keyed feature cache
    prepared_dir: str = "runs/prepared"
    workers: int = 0  # feature extraction processes (0: all cores)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"data.scale: must be a finite number > 0, got {self.scale}")
        if not (math.isfinite(self.gender_style) and self.gender_style >= 0):
            raise ValueError(f"data.gender_style: must be >= 0, got {self.gender_style}")
        if self.voice != CALIBRATED_ON:
            try:
                check_voice(self.voice)
            except ValueError as exc:
                raise ValueError(f"data.voice: {exc}") from None
        if self.workers < 0:
            raise ValueError(f"data.workers: must be >= 0 (0: all cores), got {self.workers}")


@dataclass
class FeaturesSettings:
    """``features``: the feature set (``features/<name>.yaml``) and its normalisation."""

    name: str  # emobase (openSMILE Emo-Base functionals) or an s3prl upstream (S3prlFeaturesSettings)
    # z-normalisation: speaker (the paper's: each speaker's statistics over all its shards) | client (each
    # client its own shard, as a device would) | none (as extracted)
    norm: str = "speaker"

    def __post_init__(self) -> None:
        from fed_ser.features.ssl import UPSTREAMS

        if self.name != "emobase" and self.name not in UPSTREAMS:
            raise ValueError(f"features.name: unknown feature set {self.name!r}; available: {['emobase', *UPSTREAMS]}")
        if self.norm not in NORMS:
            raise ValueError(f"features.norm: {self.norm!r} is not one of {NORMS}")


@dataclass
class S3prlFeaturesSettings(FeaturesSettings):
    """``features`` for an s3prl upstream (apc, npc, tera, ...): last hidden state averaged over time."""

    ckpt: str | None = None  # local checkpoint file; null: s3prl's download cache (~/.cache/s3prl/download/)


@dataclass
class ShadowSettings:
    """``shadow``: the attacker's threat model, where its shadow federations' data come from."""

    # corpora: other corpora (the paper's) | speakers: other speakers of the private corpus | synthetic: the synthetic corpora only
    mode: str = "corpora"
    corpora: list[str] = field(default_factory=list)  # mode=corpora: the attacker's corpora; empty: the paper's corpora other than the private one
    share: float = 0.8  # share of the attacker's data per shadow model
    speaker_share: float = 0.5  # mode=speakers: share of each fold's training speakers (per gender) held by the attacker
    engine: str = "vectorised"  # vectorised (in-process, same updates as Flower for one seed) | flower
    # false: one shadow federation and one attack CNN (the other corpora's fold 0) for every private fold;
    # true: each fold its own (mode=speakers always is)
    per_fold: bool = False

    def __post_init__(self) -> None:
        if self.mode not in SHADOW_MODES:
            raise ValueError(f"shadow.mode: {self.mode!r} is not one of {SHADOW_MODES}")
        unknown = [c for c in self.corpora if c not in LOADERS]
        if unknown:
            raise ValueError(f"shadow.corpora: {unknown} not among the corpora {sorted(LOADERS)}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"shadow.share: must be in (0, 1], got {self.share}")
        if not 0.0 < self.speaker_share < 1.0:
            raise ValueError(f"shadow.speaker_share: must be in (0, 1), got {self.speaker_share}")
        if self.engine not in ENGINES:
            raise ValueError(f"shadow.engine: {self.engine!r} is not one of {ENGINES}")


@dataclass
class ExperimentSettings:
    """The experiment's own top-level keys (``conf/experiment.yaml``; ``folds`` also set by ``size``).
    Checked with the groups, not a Hydra schema: Hydra types a config group, not a primary config's top level."""

    private: str  # the corpus whose clients are attacked (real if data.roots.<private> is set)
    private_engine: str = "flower"  # flower (Flower simulation on Ray) | vectorised (in-process, the same recorded updates for one seed)
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # the private corpus's folds attacked
    n_folds: int = 5

    def __post_init__(self) -> None:
        if self.private not in LOADERS:
            raise ValueError(f"private: {self.private!r} is not one of the corpora {sorted(LOADERS)}")
        if self.private_engine not in ENGINES:
            raise ValueError(f"private_engine: {self.private_engine!r} is not one of {ENGINES}")
        if not self.folds or any(not 0 <= f < self.n_folds for f in self.folds) or len(set(self.folds)) != len(self.folds):
            raise ValueError(f"folds: distinct folds in 0..{self.n_folds - 1} (n_folds={self.n_folds}), got {list(self.folds)}")


#: group -> its Hydra schemas (name in ``conf/<group>/`` -> dataclass), registered by :mod:`fed_ser.experiments.config`
SCHEMAS: dict[str, dict[str, type]] = {
    "attack": {"schema": AttackSettings},
    "shadow": {"schema": ShadowSettings},
    "data": {"schema": DataSettings},
    "features": {"schema": FeaturesSettings, "s3prl_schema": S3prlFeaturesSettings},
}


def _read(cls: type[T], node, key: str) -> T:
    try:
        return read_settings(cls, node, key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def attack_settings(cfg: DictConfig) -> AttackSettings:
    """``cfg.attack`` typed and checked, with the keys that depend on other groups: the layers it reads must be the model's."""
    settings = _read(AttackSettings, cfg.attack, "attack")
    unknown = [l for l in settings.layers if l not in LAYERS]
    if unknown:
        raise ConfigError(f"attack.layers: {unknown} not among the model's layers {list(LAYERS)}")
    if settings.profile.layer not in LAYERS:
        raise ConfigError(f"attack.profile.layer: {settings.profile.layer!r} is not one of the model's layers {list(LAYERS)}")
    return settings


def shadow_settings(cfg: DictConfig) -> ShadowSettings:
    """``cfg.shadow`` typed and checked."""
    return _read(ShadowSettings, cfg.shadow, "shadow")


def data_settings(cfg: DictConfig) -> DataSettings:
    """``cfg.data`` typed and checked."""
    return _read(DataSettings, cfg.data, "data")


def features_settings(cfg: DictConfig) -> FeaturesSettings:
    """``cfg.features`` typed and checked (an s3prl upstream's with its ``ckpt``)."""
    return _read(S3prlFeaturesSettings if "ckpt" in cfg.features else FeaturesSettings, cfg.features, "features")


def experiment_settings(cfg: DictConfig) -> ExperimentSettings:
    """The experiment's top-level keys typed and checked."""
    return _read(ExperimentSettings, {f.name: cfg[f.name] for f in fields(ExperimentSettings) if f.name in cfg}, "")


def check_groups(cfg: DictConfig) -> None:
    """Read every declared group ``cfg`` holds (and the experiment's own keys where it has them): the first
    wrong value stops here, one :class:`ConfigError` line naming its key."""
    if "data" in cfg:
        data_settings(cfg)
    if "features" in cfg:
        features_settings(cfg)
    if "attack" in cfg:
        attack_settings(cfg)
    if "shadow" in cfg:
        shadow_settings(cfg)
    if "private" in cfg:
        experiment_settings(cfg)
