"""The threshold study adapts fold by fold, as the headline's adaptive attack does."""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from attacks.inference.evaluate import Scores
from fed_ser.experiments.threshold_study import threshold_study


def test_each_fold_gets_its_own_adaptive_threshold():
    """Two folds whose classifiers read on different scales (fold 1's logits shifted by +6): within each fold
    women and men separate, so the adaptive threshold set per fold is right for every client at 1:1, while one
    threshold over both folds' scores would call all of fold 1 women and all of fold 0 men (50%)."""
    rng = np.random.default_rng(0)
    scores, female, keys = [], [], []
    for fold, shift in enumerate((0.0, 6.0)):
        clients = np.repeat(np.arange(20), 5)
        is_woman = clients % 2 == 1
        z = np.where(is_woman, 1.0, -1.0) + shift + rng.normal(0, 0.2, len(clients))
        scores.append(Scores(expit(z), clients))
        female.append({fold * 1000 + c: int(c % 2 == 1) for c in range(20)})
        keys.append(fold * 1000)
    study = threshold_study(scores, female, keys, trials=5, draws=5)
    one_to_one = next(r for r in study["rows"] if r["mix"] == "1 : 1")
    assert one_to_one["adaptive"]["mean"] == 1.0
    assert one_to_one["own"]["mean"] == 0.75  # the attacker's own threshold (0.5) calls all of fold 1 women
