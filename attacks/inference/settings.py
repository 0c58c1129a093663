"""The ``attack`` settings (``conf/attack/``), declared once: every key, its type, its default and its check.

:class:`AttackSettings` is the whole ``attack`` group. Its first fields are the CNN's own
hyper-parameters, :class:`AttackConfig` (what :func:`attacks.inference.train.train_attack` takes),
which it extends, so the CNN is built from the settings without copying them field by field
(:meth:`AttackSettings.cnn`); then the evaluation's and the control's settings, and one nested
block per other attack (``attack.profile``, ``attack.feature_space``).

The same dataclass is Hydra's schema ``attack/schema`` (registered by
:mod:`fed_ser.experiments.config`): an unknown key or a value of the wrong type is refused when the
config is composed, naming the key; ``__post_init__`` refuses values of the right type that make no
sense (a negative budget, an unknown precision), one line naming the key, before anything runs.
Read a composed config with :meth:`AttackSettings.from_mapping` (or
:func:`fed_ser.experiments.settings.attack_settings`, which also checks the keys that depend on
other groups). The defaults of :class:`AttackConfig` are the paper's CNN (Adam lr 1e-4, wd 1e-4,
batch 20, <= 50 epochs, pools 2/4/8, first stride 1); ``conf/attack/default.yaml`` makes it
CPU-sized (first stride 4, pools 1/4/4) and ``attack=paper`` restores the paper's layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from fed_ser.core.settings import read_settings

#: ``attack.precision``: auto (bfloat16 autocast where the CPU computes it natively, else float32) | float32 | bfloat16
PRECISIONS = ("auto", "float32", "bfloat16")
#: ``attack.feature_space.draws_from``: where the feature-space attack's training statistics come from
DRAWS_FROM = ("speakers", "clients")


@dataclass
class AttackConfig:
    """The CNN attack's hyper-parameters (Feng et al. 2021, Section 4), defaults the paper's: Adam lr 1e-4,
    weight decay 1e-4, batch 20, <= 50 epochs with early stopping on held-out shadow clients."""

    layers: list[str] = field(default_factory=lambda: ["dense1", "dense2", "out"])  # the SER layers whose updates are read
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 20
    max_epochs: int = 50
    patience: int = 6  # epochs without a better held-out UAR before training stops
    val_share: float = 0.2  # share of the shadow clients held out for early stopping
    channels: tuple[int, ...] = (16, 32, 64)  # output channels of each convolution
    kernel: int = 5
    pools: tuple[int, ...] = (2, 4, 8)  # max-pool size after each convolution
    first_stride: int = 1  # stride of the first convolution
    dropout: float = 0.2
    max_updates: int = 0  # 0: every shadow update; else a random subset of this many
    seed: int = 0  # the CNN's and the evaluation's seed
    precision: str = "auto"  # one of PRECISIONS

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"attack.layers: must name each layer at most once, and at least one, got {list(self.layers)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"attack.lr: must be a finite number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"attack.weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("batch_size", "max_epochs", "patience", "kernel", "first_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"attack.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_share < 1.0:
            raise ValueError(f"attack.val_share: must be in [0, 1), got {self.val_share}")
        if len(self.pools) != len(self.channels) or min((*self.pools, *self.channels), default=0) < 1:
            raise ValueError(f"attack.pools: one pool size >= 1 per convolution of attack.channels {list(self.channels)}, "
                             f"got {list(self.pools)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"attack.dropout: must be in [0, 1), got {self.dropout}")
        if self.max_updates < 0:
            raise ValueError(f"attack.max_updates: must be >= 0 (0: every shadow update), got {self.max_updates}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"attack.precision: {self.precision!r} is not one of {PRECISIONS}")


@dataclass
class ProfileSettings:
    """``attack.profile``: the input-profile attack (:mod:`attacks.inference.profile`), run beside the CNN."""

    enabled: bool = True
    layer: str = "dense1"  # a dense layer: its update summed over output units
    l2: float = 0.01  # inverse L2 strength of the logistic regression

    def __post_init__(self) -> None:
        if not self.l2 > 0:
            raise ValueError(f"attack.profile.l2: must be > 0, got {self.l2}")


@dataclass
class FeatureSpaceSettings:
    """``attack.feature_space``: the feature-space attack (:mod:`attacks.inference.feature_space`): invert
    each update (:mod:`attacks.inference.inversion`), read the client's statistics."""

    enabled: bool = True
    l2: float = 0.01  # inverse L2 strength of the logistic regression on emotion-conditional means
    draws: int = 20  # simulated batches per attacker client and pool size (the classifier's training set)
    # speakers: virtual clients drawn from each attacker speaker's utterances, sized like the attacked
    # clients | clients: the attacker's own shards re-sampled (fed-ser's first version)
    draws_from: str = "speakers"
    ransac_draws: int = 20_000  # per inversion pass, for samples no gradient row points to
    # a pass that has found a sample stops after this many draws without another and deflates
    # (0: every pass draws its whole budget; benchmarks/README.md says what that costs and recovers)
    ransac_stall: int = 1_000
    # a pass over a residual that has found nothing stops after this many draws, and what is left is
    # searched in the undeflated gradient (0: it draws its whole budget)
    ransac_give_up: int = 5_000
    workers: int = 0  # processes inverting updates side by side (0: every core); each update's draws have their own seed
    # the same for a round sum (the observer of aggregates); null: ransac_draws. A sum of many clients'
    # batches costs far more draws per sample: a time budget, reported
    aggregate_ransac_draws: int | None = None

    def __post_init__(self) -> None:
        if not self.l2 > 0:
            raise ValueError(f"attack.feature_space.l2: must be > 0, got {self.l2}")
        if self.draws < 1:
            raise ValueError(f"attack.feature_space.draws: must be >= 1, got {self.draws}")
        if self.draws_from not in DRAWS_FROM:
            raise ValueError(f"attack.feature_space.draws_from: {self.draws_from!r} is not one of {DRAWS_FROM}")
        if self.ransac_draws < 0:
            raise ValueError(f"attack.feature_space.ransac_draws: must be >= 0, got {self.ransac_draws}")
        if self.ransac_stall < 0:
            raise ValueError(f"attack.feature_space.ransac_stall: must be >= 0 (0: every pass draws its whole budget), "
                             f"got {self.ransac_stall}")
        if self.ransac_give_up < 0:
            raise ValueError(f"attack.feature_space.ransac_give_up: must be >= 0 (0: a fruitless pass draws its whole "
                             f"budget), got {self.ransac_give_up}")
        if self.workers < 0:
            raise ValueError(f"attack.feature_space.workers: must be >= 0 (0: every core), got {self.workers}")
        if self.aggregate_ransac_draws is not None and self.aggregate_ransac_draws < 0:
            raise ValueError(f"attack.feature_space.aggregate_ransac_draws: must be >= 0 or null (null: "
                             f"attack.feature_space.ransac_draws), got {self.aggregate_ransac_draws}")

    @property
    def aggregate_draws(self) -> int:
        """RANSAC draws per pass for a round sum: ``aggregate_ransac_draws``, or ``ransac_draws`` when null."""
        return self.ransac_draws if self.aggregate_ransac_draws is None else self.aggregate_ransac_draws


@dataclass
class RoundMatchedSettings:
    """``attack.round_matched``: the round-matched shadow attack on FedAvg updates
    (:mod:`attacks.inference.round_matched`): the attacked round replayed from its global model on the
    attacker's speakers, the real update classified against the simulated ones."""

    enabled: bool = True  # runs where it applies: fl.algorithm=fedavg with recorded global models
    per_update: int = 32  # virtual clients simulated for each distinct (round, num-examples) attacked

    def __post_init__(self) -> None:
        if self.per_update < 4:
            raise ValueError(f"attack.round_matched.per_update: must be >= 4 (cross-validation holds out a woman and a "
                             f"man), got {self.per_update}")


@dataclass
class AttackSettings(AttackConfig):
    """The ``attack`` group: the CNN's :class:`AttackConfig`, the evaluation, the control, the other attacks."""

    trials: int = 10  # random updates per private client (ASR)
    pool_rounds: list[int] = field(default_factory=lambda: [1, 5])  # ASR when k rounds of a client's updates are pooled
    # the control beside every attack: each attack fitted again on the attacker's speakers relabelled (genders
    # shuffled across speakers, the true labelling and its inverse excluded): the permutation p-value
    with_control: bool = True
    control_permutations: int = 19  # relabellings per attack, as many as the attacker's speakers allow: p >= 1/(this + 1)
    # the CNN's (each costs a CNN training; 0: no control for the CNN; 2: one relabelling and its
    # inverse, the fewest that can tell a control above chance)
    cnn_control_permutations: int = 2
    aggregate_observer: bool = False  # also attack as an observer of the round sums only (SecAgg+, the global models)
    profile: ProfileSettings = field(default_factory=ProfileSettings)
    feature_space: FeatureSpaceSettings = field(default_factory=FeatureSpaceSettings)
    round_matched: RoundMatchedSettings = field(default_factory=RoundMatchedSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trials < 1:
            raise ValueError(f"attack.trials: must be >= 1, got {self.trials}")
        if not self.pool_rounds or min(self.pool_rounds) < 1:
            raise ValueError(f"attack.pool_rounds: one or more round counts >= 1, got {list(self.pool_rounds)}")
        if self.control_permutations < 1:
            raise ValueError(f"attack.control_permutations: must be >= 1, got {self.control_permutations}")
        if self.cnn_control_permutations < 0:
            raise ValueError(f"attack.cnn_control_permutations: must be >= 0 (0: no control for the CNN), "
                             f"got {self.cnn_control_permutations}")

    @classmethod
    def from_mapping(cls, attack: Mapping) -> AttackSettings:
        """The ``attack`` settings from a composed config's ``attack`` node (or a dict of some of its keys:
        the others take their defaults); a wrong value is a ValueError naming its key."""
        return read_settings(cls, attack, "attack")

    def cnn(self) -> AttackConfig:
        """The CNN's hyper-parameters: the :class:`AttackConfig` part of these settings."""
        return AttackConfig(**{f.name: getattr(self, f.name) for f in fields(AttackConfig)})
