"""Every attribute inference attack fed-ser runs, by name.

Adding an attack: a module with a class that implements :class:`attacks.inference.base.Attack`
(with ``from_settings(attack)`` building it from the ``attack`` settings, or returning None when
they turn it off), one line here, and its settings in ``conf/attack/``. The experiment driver runs
every attack that :meth:`~attacks.inference.base.Attack.applies`, its control and its evaluation;
the reports list whatever evaluations the attacks returned, under the labels they give.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from attacks.inference.aggregate import RoundSumDifferencing
from attacks.inference.base import Attack
from attacks.inference.cnn import PaperCNN
from attacks.inference.feature_space import FeatureSpace
from attacks.inference.profile import InputProfile
from attacks.inference.round_matched import RoundMatched

#: name -> ``from_settings(attack settings) -> Attack | None`` (None: turned off).
ATTACKS: dict[str, Callable[[Mapping], Attack | None]] = {
    "cnn": PaperCNN.from_settings,
    "profile": InputProfile.from_settings,
    "feature-space": FeatureSpace.from_settings,
    "aggregate": RoundSumDifferencing.from_settings,
    "round-matched": RoundMatched.from_settings,
}


def build_attacks(attack: Mapping) -> dict[str, Attack]:
    """The attacks the ``attack`` settings turn on, by name, unfitted."""
    built = {name: make(attack) for name, make in ATTACKS.items()}
    return {name: a for name, a in built.items() if a is not None}


def make_attack(name: str, attack: Mapping) -> Attack:
    """A fresh, unfitted attack ``name`` built from the ``attack`` settings."""
    made = ATTACKS[name](attack)
    if made is None:
        raise ValueError(f"attack {name!r} is turned off by its settings")
    return made
