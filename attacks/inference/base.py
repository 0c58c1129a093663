"""The attack interface: what the attacker holds, what the server saw, and what every attack does.

An attribute inference attack is two steps, kept apart so that no ground truth can reach a score:

* :meth:`Attack.fit` on the attacker's own data (:class:`AttackerData`: its shadow federations'
  recorded updates and its own speakers' features, labelled with their genders) and, where the
  attack needs it, on the server's view (e.g. the attacked clients' sizes, the rounds' global models);
* :meth:`Attack.score` on the server's view (:class:`ServerView`: the recorded updates, the global
  models, the local settings, what the inversion recovered) returning :class:`Scores`, P(female)
  per update or per client. Only then does :mod:`attacks.inference.evaluate` join the truth.

Attacks register by name in :mod:`attacks.inference.registry`; the experiment driver runs every
registered attack that applies to the view, its control (the same attack fitted on relabelled
speakers, :meth:`AttackerData.relabelled`) and the evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import numpy as np

from attacks.inference.evaluate import Scores
from attacks.inference.inversion import Recovered
from attacks.inference.simulate import LocalSettings
from fed_ser.recording.store import UpdateInfo, UpdateStore

__all__ = ["Attack", "AttackerData", "LocalSettings", "ServerView"]


@dataclass
class AttackerData:
    """What the attacker holds of its own: its shadow federations' recorded updates and its
    speakers' features (z-normalised as the protocol normalises), with each client's speaker and gender.

    ``client_speaker`` keys are ``<corpus>/<speaker>``; ``client_female[c]`` says client ``c``
    is a woman. The shadow updates are labelled through their client id.
    """

    X: np.ndarray  # (rows, features)
    y: np.ndarray  # (rows,) emotion index
    client: np.ndarray  # (rows,) client index, -1: not a client's row (held-out speakers)
    client_speaker: np.ndarray  # (clients,) speaker key
    client_female: np.ndarray  # (clients,) bool
    store: UpdateStore | None = None  # the shadow federations' recorded updates (None: no shadow federation)
    updates: list[UpdateInfo] = field(default_factory=list)
    train: np.ndarray | None = None  # (rows,) the rows its clients train on (None: every client row)
    X_raw: np.ndarray | None = None  # (rows, features) before normalisation, under features.norm=client: a virtual
    # client then z-normalises its own rows, as each private client normalised its shard

    def __post_init__(self) -> None:
        self.client_female = np.asarray(self.client_female, dtype=bool)
        if self.train is None:
            self.train = self.client >= 0
        for s in np.unique(self.client_speaker):
            if len(np.unique(self.client_female[self.client_speaker == s])) > 1:
                raise ValueError(f"attacker speaker {s}: its clients are labelled with both genders")

    @property
    def row_speaker(self) -> np.ndarray:
        """The speaker key of each client row (``''`` for rows of no client)."""
        out = np.full(len(self.client), "", dtype=object)
        own = self.client >= 0
        out[own] = self.client_speaker[self.client[own]]
        return out

    @property
    def update_labels(self) -> np.ndarray:
        """1 = female, per shadow update."""
        return np.array([int(self.client_female[u.client]) for u in self.updates], dtype=np.int64)

    def speaker_female(self) -> dict[str, bool]:
        """Each attacker speaker's gender (True = woman)."""
        return {str(s): bool(self.client_female[self.client_speaker == s][0]) for s in np.unique(self.client_speaker)}

    def relabelled(self, female: Mapping[str, bool]) -> AttackerData:
        """The same data with every speaker's clients labelled ``female[speaker]`` (the control's
        labellings: a speaker's clients always share one label)."""
        return replace(self, client_female=np.array([bool(female[str(s)]) for s in self.client_speaker]))

    def fingerprint(self) -> str:
        """What an attack fitted on these data only is known by (the store and the labels)."""
        h = hashlib.sha256(str(self.store.path if self.store is not None else "").encode())
        h.update(self.client_female.tobytes())
        h.update(str(len(self.updates)).encode())
        return h.hexdigest()[:16]


@dataclass
class ServerView:
    """What the attacked run showed its observer; the only input an attack's score may read.

    ``updates`` are the client updates as received (round, client id, ``num-examples``); under
    SecAgg+ there are none. ``recovered`` holds the inversion of each update (the feature-space
    pipeline's first step, shared by the attacks that read it); ``aggregates`` the inverted round
    sums per observer name (the observers of aggregates).
    """

    store: UpdateStore | None
    updates: list[UpdateInfo]
    local: LocalSettings
    recovered: list[Recovered] | None = None
    aggregates: dict = field(default_factory=dict)

    @property
    def clients(self) -> np.ndarray:
        """The client id of each update."""
        return np.array([u.client for u in self.updates], dtype=np.int64)

    @property
    def sizes(self) -> np.ndarray:
        """Each update's ``num-examples`` (sent in the clear with every reply)."""
        return np.array([u.num_examples for u in self.updates], dtype=np.int64)


class Attack(Protocol):
    """One attribute inference attack (see the module docstring)."""

    name: ClassVar[str]
    #: True when :meth:`fit` reads the server's view (then it is fitted again for every attacked run);
    #: False when it reads the attacker's data only (one fit serves every fold sharing that attacker).
    fit_reads_view: ClassVar[bool]
    #: True when fitting costs minutes (the control then runs ``attack.cnn_control_permutations`` labellings).
    costly: ClassVar[bool]

    def applies(self, attacker: AttackerData, view: ServerView) -> bool:
        """Whether this attack can run here (e.g. the CNN needs shadow updates and client updates). An attack may
        also define ``why_not(attacker, view) -> str | None``, the reason the report gives when this is False."""
        ...

    def fit(self, attacker: AttackerData, view: ServerView) -> None: ...

    def score(self, view: ServerView) -> dict[str, Scores]:
        """Evaluation name -> scores; an attack may report variants (e.g. per layer, or another threshold)."""
        ...

    def describe(self) -> dict:
        """What the fit produced that a report shows (training history, fusion weights)."""
        ...
