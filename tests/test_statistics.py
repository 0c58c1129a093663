"""Figures as certain as their evidence: speaker-level intervals, balanced accuracy, the majority
baseline, ROC over clients with TPR only where enough men exist, relabellings for the controls."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.inference.evaluate import Population, Scores, evaluate_attack, summarize
from fed_ser.core.statistics import (
    balanced_accuracy,
    clopper_pearson,
    cluster_interval,
    majority_baseline,
    permutation_p_value,
    speaker_labellings,
    uar_from_counts,
    uar_interval,
)


def _population(speakers: int, clients_per_speaker: int, women: int) -> Population:
    female, speaker = {}, {}
    for s in range(speakers):
        for j in range(clients_per_speaker):
            key = s * 100 + j
            female[key], speaker[key] = int(s < women), f"corpus/{s:02d}"
    return Population(female, speaker)


def _scores(pop: Population, right: dict[int, bool], updates: int = 5) -> Scores:
    """Each client's updates all read its gender right (or all wrong)."""
    clients = np.repeat(sorted(pop.female), updates)
    p = np.array([0.9 if pop.female[c] == right[c] else 0.1 for c in clients])
    return Scores(p, clients)


def test_an_interval_over_speakers_is_as_wide_as_the_speakers_allow():
    """9 speakers x 9 clients, every client of 2 speakers wrong: resampling clients would call it
    78% +- 9; over speakers the interval reaches down towards half, as the issue's EmoDB case does."""
    pop = _population(9, 9, 4)
    wrong = {"corpus/00", "corpus/05"}
    summary = summarize([evaluate_attack(_scores(pop, {c: pop.speaker[c] not in wrong for c in pop.female}), pop)])
    lo, hi = summary["asr_ci"]
    assert summary["asr"] == pytest.approx(7 / 9)
    assert lo < 0.56 and hi == 1.0 and summary["speakers"] == 9 and summary["clients"] == 81
    success = np.array([0.0 if pop.speaker[c] in wrong else 1.0 for c in sorted(pop.female)])
    by_client = cluster_interval(success, np.arange(len(success)), lambda idx: float(success[idx].mean()))
    assert by_client.low > 0.67  # what counting every client as independent would have claimed


def test_where_every_speaker_agrees_the_interval_is_exact_over_speakers():
    pop = _population(9, 4, 4)
    summary = summarize([evaluate_attack(_scores(pop, dict.fromkeys(pop.female, True)), pop)])
    assert summary["asr"] == 1.0 and summary["asr_ci"] == pytest.approx(list(clopper_pearson(9, 9)))
    assert summary["asr_ci"][0] == pytest.approx(0.664, abs=1e-3) and "Clopper-Pearson" in summary["interval"]


def test_a_constant_guess_on_an_unbalanced_population_is_not_leakage():
    """11 men and 3 women: always guessing 'man' scores 78.6% ASR, 50% balanced accuracy."""
    pop = _population(14, 1, 3)
    constant = Scores(np.full(14 * 5, 0.2), np.repeat(sorted(pop.female), 5))
    s = summarize([evaluate_attack(constant, pop)])
    assert s["asr"] == pytest.approx(11 / 14) and s["majority"] == pytest.approx(11 / 14)
    assert s["balanced"] == pytest.approx(0.5)
    assert balanced_accuracy(np.array([1.0, 0.0]), np.array([1, 1])) != balanced_accuracy(np.array([1.0, 0.0]), np.array([1, 0]))
    assert majority_baseline(np.array([1, 0, 0, 0])) == 0.75


def test_roc_is_over_clients_and_tpr_at_an_fpr_needs_enough_men():
    pop = _population(10, 8, 5)  # 5 men: 10% FPR cannot be resolved, let alone 1%
    s = summarize([evaluate_attack(_scores(pop, dict.fromkeys(pop.female, True)), pop)])
    assert s["auc"] == 1.0 and len(s["roc"]["fpr"]) <= 4  # one score per client, not per update
    assert s["tpr_at_fpr"] == {"0.1": None, "0.01": None} and s["tpr_note"]["0.1"] == "n/a: 5 men"
    many = _population(40, 1, 20)
    s = summarize([evaluate_attack(_scores(many, dict.fromkeys(many.female, True)), many)])
    assert s["tpr_at_fpr"]["0.1"] == 1.0 and s["tpr_at_fpr"]["0.01"] is None


def test_folds_pool_with_a_speaker_attacked_in_several_folds_as_one_cluster():
    pop = _population(4, 2, 2)
    folds = []
    for f in range(3):
        keyed = Population({f * 100_000 + c: v for c, v in pop.female.items()}, {f * 100_000 + c: s for c, s in pop.speaker.items()})
        folds.append(evaluate_attack(_scores(pop, dict.fromkeys(pop.female, True)), keyed, key_offset=f * 100_000))
    s = summarize(folds)
    assert s["clients"] == 24 and s["speakers"] == 4
    with pytest.raises(ValueError, match="key clients by fold"):
        summarize([folds[0], folds[0]])


def test_relabellings_keep_the_gender_counts_and_exclude_the_truth_and_its_inverse():
    truth = {"a": True, "b": True, "c": False, "d": False}
    labs = speaker_labellings(truth, 99)
    assert len(labs) == 4  # C(4, 2) = 6, less the truth and its inverse
    inverse = {s: not v for s, v in truth.items()}
    assert all(lab not in (truth, inverse) and sum(lab.values()) == 2 for lab in labs)
    big = {f"s{i}": i < 7 for i in range(20)}
    labs = speaker_labellings(big, 19, seed=3)
    assert len(labs) == 19 and len({tuple(sorted(lab.items())) for lab in labs}) == 19 and big not in labs
    assert speaker_labellings({"a": True, "b": False}, 10) == []  # two speakers: nothing but the truth and its inverse


def test_the_permutation_p_value_counts_the_attack_itself():
    assert permutation_p_value(0.9, [0.5, 0.4, 0.6, 0.55]) == pytest.approx(1 / 5)
    assert permutation_p_value(0.5, [0.5, 0.4, 0.6, 0.55]) == pytest.approx(4 / 5)


def test_the_ser_uar_interval_is_over_held_out_speakers():
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(6):  # per speaker and emotion: 10 rows, 2-8 recognised
        n = np.full(4, 10)
        counts.append(np.stack([n, rng.integers(2, 9, 4)], axis=1))
    counts = np.array(counts)
    iv = uar_interval(counts)
    assert iv.point == pytest.approx(uar_from_counts(counts)) and iv.low < iv.point < iv.high
    assert uar_from_counts(np.array([[[4, 4], [0, 0], [2, 0], [0, 0]]])) == 0.5  # absent classes left out


def test_the_rank_auc_is_sklearns():
    from sklearn.metrics import roc_auc_score

    from fed_ser.core.statistics import roc_auc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # with ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_relabellings_come_in_inverse_pairs_when_the_genders_balance():
    truth = {f"s{i}": i < 5 for i in range(10)}
    labs = speaker_labellings(truth, 8, seed=1)
    assert len(labs) == 8
    for a, b in zip(labs[::2], labs[1::2]):
        assert all(a[s] != b[s] for s in truth)  # a relabelling and its inverse
    unbalanced = speaker_labellings({f"s{i}": i < 3 for i in range(8)}, 5)
    assert len(unbalanced) == 5 and all(sum(lab.values()) == 3 for lab in unbalanced)
