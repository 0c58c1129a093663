"""The observer of aggregates: what is left to infer when only each round's sum is seen.

Under SecAgg+ the server learns the round's weighted sum of the updates and who took part, not the
updates themselves; an observer of the global models learns the same sum from two consecutive
global models, with any central DP noise in it. :func:`round_aggregates` rebuilds exactly that view
from a store (``theta(t) - theta(t+1)``, over the server step: the round's mean gradient, or mean
pseudo-gradient), and :func:`differencing_scores` turns a score per round (e.g. the feature-space
attack's P(female) of the batch inverted from the aggregate: the round's share of female clients)
into a score per client, from the difference between the rounds it joined and the rounds it did not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attacks.inference.base import AttackerData, ServerView
from attacks.inference.evaluate import Scores
from attacks.inference.feature_space import FeatureSpace, FeatureSpaceAttack
from fed_ser.recording.store import UpdateStore


@dataclass(frozen=True)
class RoundAggregate:
    """One round as an observer of aggregates sees it."""

    round: int
    clients: tuple[int, ...]  # the clients that took part (SecAgg+ reveals who did)
    batch_size: int  # utterances behind the sum (FedSGD: sum of min(B, n_k))
    update: dict[str, np.ndarray]  # the round's mean (pseudo-)gradient, as the global models give it
    params: dict[str, np.ndarray]  # the global model the round started from


def round_aggregates(store: UpdateStore, batch_size: int, members: dict[int, tuple[int, ...]] | None = None,
                     server_view: bool = False) -> list[RoundAggregate]:
    """Every round whose outcome is recorded, as an observer of the aggregates sees it.

    The update is ``(theta(t) - theta(t+1)) / (lr T)`` with ``T`` the round's mean local step count
    (FedSGD: ``T = 1``): the mean update the server applied, DP noise included. ``server_view``: the
    round's unmasked mean reply (``kind="aggregate"``: what a server under SecAgg+ records, with the
    global models, never an update) takes the place of ``theta(t+1)``: the server's own view, before
    any noise it adds. ``members`` (round -> clients) says who took part when the store holds no
    client updates (SecAgg+ reveals it); each member's batch then counts as ``batch_size``, an upper
    bound (Flower's SecAgg+ also passes each ``n_k`` in the clear; the inversion reads the true count off
    the spectrum), and the step count as 1 (FedSGD; a FedAvg sum is not inverted anyway).
    """
    rounds: dict[int, tuple[tuple[int, ...], int, float]] = {}  # round -> (members, batch, mean steps)
    if members is None:
        by_round: dict[int, list] = {}
        for u in store.updates():
            by_round.setdefault(u.round, []).append(u)
        for rnd, ups in by_round.items():
            batch = sum(min(batch_size, u.num_examples) if u.kind == "gradient" else u.num_examples for u in ups)
            rounds[rnd] = (tuple(sorted(u.client for u in ups)), int(batch), float(np.mean([max(u.steps, 1) for u in ups])))
    else:
        rounds = {int(r): (tuple(sorted(c)), batch_size * len(c), 1.0) for r, c in members.items() if c}
    out = []
    for rnd in sorted(rounds):
        now = store.global_record(rnd)
        nxt = store.aggregate_record(rnd) if server_view else store.global_record(rnd + 1)
        if now is None or nxt is None:
            continue
        clients, batch, steps = rounds[rnd]
        before, after = store.read(now), store.read(nxt)
        scale = 1.0 / (now.lr * steps)
        update = {k: (before[k].astype(np.float64) - after[k]) * scale for k in after}
        out.append(RoundAggregate(rnd, clients, batch, update, before))
    return out


def differencing_scores(round_scores: dict[int, float], members: dict[int, tuple[int, ...]],
                        clients: list[int]) -> np.ndarray:
    """Per client: mean round score over the rounds it joined minus over the rounds it did not,
    mapped monotonically to (0, 1) (0.5: no difference; NaN-free: a client never seen gets 0.5)."""
    rounds = [r for r in round_scores if np.isfinite(round_scores[r])]
    s = np.array([round_scores[r] for r in rounds])
    out = []
    for c in clients:
        joined = np.array([c in members[r] for r in rounds], dtype=bool)
        if joined.all() or not joined.any():
            out.append(0.5)
            continue
        out.append(0.5 + 0.5 * np.tanh(float(s[joined].mean() - s[~joined].mean())))
    return np.array(out)


class RoundSumDifferencing:
    """The observer of aggregates as an :class:`~attacks.inference.base.Attack` (``attack.aggregate_observer``):
    each inverted round sum is read by the feature-space classifier (its P(female): the round's share
    of women) and each client is scored by :func:`differencing_scores`. One score per client."""

    name: ClassVar[str] = "aggregate"
    fit_reads_view: ClassVar[bool] = True
    costly: ClassVar[bool] = False
    labels: ClassVar[dict[str, str]] = {
        "aggregate-observer": "observer of aggregates (round-sum inversion + differencing)",
        "server-sum-differencing": "server under SecAgg+ (differencing the sums it unmasks)"}

    def __init__(self, classifier: FeatureSpace):
        self.classifier = classifier
        self.fitted: FeatureSpaceAttack | None = None

    @classmethod
    def from_settings(cls, attack: Mapping) -> RoundSumDifferencing | None:
        classifier = FeatureSpace.from_settings(attack)
        return cls(classifier) if classifier is not None and bool(attack["aggregate_observer"]) else None

    def applies(self, attacker: AttackerData, view: ServerView) -> bool:
        return any(view.aggregates.values())

    def fit(self, attacker: AttackerData, view: ServerView) -> None:
        self.fitted = self.classifier.fit_classifier(attacker, view)

    def score(self, view: ServerView) -> dict[str, Scores]:
        if self.fitted is None:
            raise RuntimeError("the observer of aggregates is not fitted")
        out = {}
        for name, inverted in view.aggregates.items():
            if not inverted:  # no round whose outcome is recorded (e.g. a one-round run)
                continue
            round_scores = {a.round: self.fitted.p_female(r.inputs, r.labels) for a, r in inverted}
            # every client that took part (SecAgg+: as the rounds' members say)
            clients = sorted({u.client for u in view.updates} or {p for a, _ in inverted for p in a.clients})
            p = differencing_scores(round_scores, {a.round: a.clients for a, _ in inverted}, clients)
            out[name] = Scores(p, np.array(clients), trials=1)
        return out

    def describe(self) -> dict:
        return {}
