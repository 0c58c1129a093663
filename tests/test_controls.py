"""Controls that can fail: each attack is fitted again on the attacker's speakers relabelled, and the
real attack's balanced accuracy is tested against those fits. A planted leak (an attack that reads
the private genders through a side channel) is caught by its control, an attack without signal is
not called significant, and one with signal is. Attacks enter through the registry, as a new one would."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
from omegaconf import OmegaConf

from attacks.inference import registry
from attacks.inference.base import AttackerData, LocalSettings, ServerView
from attacks.inference.evaluate import NotFinite, Population, Scores
from fed_ser.experiments.evaluation import AttackStage, pooled_summary
from fed_ser.recording.store import UpdateInfo

ATTACKER_SPEAKERS, PRIVATE_SPEAKERS, SHARDS, DIM = 20, 10, 2, 40


def _speakers(n: int, signal: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per speaker: a gender (half women) and a statistic whose first coordinate carries it with strength
    ``signal``; every coordinate also varies from speaker to speaker."""
    female = np.arange(n) % 2 == 0
    stat = rng.normal(0, 1, (n, DIM))
    stat[:, 0] += signal * (2 * female - 1)
    return female, stat


def _attacker(rng: np.random.Generator) -> AttackerData:
    female, stat = _speakers(ATTACKER_SPEAKERS, 2.0, rng)
    client = np.repeat(np.arange(ATTACKER_SPEAKERS), 4)
    X = stat[client] + rng.normal(0, 0.3, (len(client), DIM))
    return AttackerData(X=X, y=np.zeros(len(client), dtype=np.int64), client=client,
                        client_speaker=np.array([f"a/{s}" for s in range(ATTACKER_SPEAKERS)]), client_female=female)


def _private(signal: float, rng: np.random.Generator) -> tuple[ServerView, Population, dict[int, np.ndarray]]:
    female, stat = _speakers(PRIVATE_SPEAKERS, signal, rng)
    updates, reads, truth, spk = [], {}, {}, {}
    for s in range(PRIVATE_SPEAKERS):
        for j in range(SHARDS):
            c = s * SHARDS + j
            reads[c], truth[c], spk[c] = stat[s] + rng.normal(0, 0.3, DIM), int(female[s]), f"p/{s}"
            updates += [UpdateInfo(r, -1, c, 8, 1, 0.1, "gradient", "float32", {}) for r in range(1, 4)]
    view = ServerView(None, updates, LocalSettings(algorithm="fedsgd", lr=0.1, batch_size=20, local_epochs=1, optimizer="sgd", dropout=0.2))
    return view, Population(truth, spk), reads


class _Fake:
    """A registered attack reading one statistic per client: the direction between the attacker's women
    and men (its speakers' mean statistics), then a logistic link."""

    fit_reads_view: ClassVar[bool] = False
    costly: ClassVar[bool] = False
    labels: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str, reads: dict[int, np.ndarray], truth: dict[int, int] | None = None):
        self.name, self.reads, self.truth = name, reads, truth
        self.w, self.mid = np.zeros(DIM), np.zeros(DIM)

    def applies(self, attacker, view) -> bool:
        return True

    def fit(self, attacker: AttackerData, view: ServerView) -> None:
        per = np.array([attacker.X[attacker.client == c].mean(0) for c in range(len(attacker.client_female))])
        women, men = per[attacker.client_female].mean(0), per[~attacker.client_female].mean(0)
        self.w, self.mid = women - men, (women + men) / 2

    def score(self, view: ServerView) -> dict[str, Scores]:
        clients = view.clients
        if self.truth is not None:  # the planted leak: the private genders through a side channel
            p = np.array([0.9 if self.truth[c] else 0.1 for c in clients])
        else:
            p = 1 / (1 + np.exp(-np.array([(self.reads[c] - self.mid) @ self.w for c in clients])))
        return {self.name: Scores(p, clients)}

    def describe(self) -> dict:
        return {}


def _run(monkeypatch, signal: float, leak: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    attacker = _attacker(rng)
    view, truth, reads = _private(signal, rng)
    for name in list(registry.ATTACKS):
        monkeypatch.delitem(registry.ATTACKS, name)
    monkeypatch.setitem(registry.ATTACKS, "fake", lambda a: _Fake("fake", reads, truth.female if leak else None))
    cfg = OmegaConf.create({"attack": {"trials": 5, "seed": 0, "pool_rounds": [1], "control_permutations": 19,
                                       "cnn_control_permutations": 1}})
    fold = AttackStage(cfg).run(attacker, view, truth, fold=0, control=True)
    return pooled_summary([fold], limit=19)["fake"]


def test_an_attack_with_signal_is_significant_and_its_control_at_chance(monkeypatch):
    m = _run(monkeypatch, signal=2.0)
    assert m["balanced"] > 0.85 and m["permutations"] == 19
    assert m["p_value"] <= 0.1  # at most one relabelling does as well (the smallest p 19 allow: 0.05)
    assert not m["control"]["above_chance"] and m["control"]["balanced"] < 0.7


def test_an_attack_without_signal_is_not_called_significant(monkeypatch):
    """Without signal the p-value is uniform over its 20 values: over 10 private corpora it is small only
    as often as chance makes it, and its control sits at chance (above it at most once, as chance allows)."""
    runs = [_run(monkeypatch, signal=0.0, seed=seed) for seed in range(10)]
    p = np.array([m["p_value"] for m in runs])
    assert (p <= 0.05).sum() <= 2 and p.mean() > 0.3, p
    control = np.array([m["control"]["balanced"] for m in runs])
    assert sum(m["control"]["above_chance"] for m in runs) <= 1 and abs(control.mean() - 0.5) < 0.05, control


def test_a_planted_leak_is_caught_by_its_control(monkeypatch):
    """The attack reads the private genders whatever it was fitted on: its control cannot fall to chance."""
    m = _run(monkeypatch, signal=0.0, leak=True)
    assert m["balanced"] == 1.0
    assert m["control"]["above_chance"] and m["control"]["balanced"] == 1.0
    assert m["p_value"] == 1.0


class _Diverged(_Fake):
    """An attack reading a diverged run's NaN updates: its classifier refuses them (``raise_``) or hands them on."""

    def __init__(self, name: str, reads: dict[int, np.ndarray], raise_: str | None):
        super().__init__(name, reads)
        self.raise_ = raise_

    def score(self, view: ServerView) -> dict[str, Scores]:
        if self.raise_ == "nan":
            raise NotFinite("the attacked updates hold NaN")
        if self.raise_ == "bug":
            raise ValueError("operands could not be broadcast together")
        return {self.name: Scores(np.full(len(view.clients), np.nan), view.clients)}


def test_an_attack_that_reads_nan_is_not_run_and_the_others_are(monkeypatch):
    """A diverged federation's updates: an attack whose scoring fails, or whose scores are NaN, is reported as not
    run with its reason (no control evaluated for it), and the other attacks and their controls run as before."""
    rng = np.random.default_rng(0)
    attacker = _attacker(rng)
    view, truth, reads = _private(2.0, rng)
    for name in list(registry.ATTACKS):
        monkeypatch.delitem(registry.ATTACKS, name)
    monkeypatch.setitem(registry.ATTACKS, "fake", lambda a: _Fake("fake", reads))
    monkeypatch.setitem(registry.ATTACKS, "raises", lambda a: _Diverged("raises", reads, "nan"))
    monkeypatch.setitem(registry.ATTACKS, "nan", lambda a: _Diverged("nan", reads, None))
    cfg = OmegaConf.create({"attack": {"trials": 5, "seed": 0, "pool_rounds": [1], "control_permutations": 3,
                                       "cnn_control_permutations": 1}})
    fold = AttackStage(cfg).run(attacker, view, truth, fold=0, control=True)
    assert set(fold.evaluations) == {"fake"} and len(fold.controls["fake"]) == 3 and set(fold.controls) == {"fake"}
    assert "NaN" in fold.described["raises"]["not_run"] and "not finite" in fold.described["nan"]["not_run"]
    # any other error while scoring is a bug: it stops the run instead of reading as "not run"
    monkeypatch.setitem(registry.ATTACKS, "bug", lambda a: _Diverged("bug", reads, "bug"))
    with pytest.raises(ValueError, match="broadcast"):
        AttackStage(cfg).run(attacker, view, truth, fold=0, control=False)
