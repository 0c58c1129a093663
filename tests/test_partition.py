"""Clients and speaker-independent folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fed_ser.data.federated import TEST, TRAIN, VAL, build_federated
from fed_ser.data.partition import PartitionError, shard_speakers, speaker_folds


def test_folds_hold_out_20_percent_balanced_by_gender():
    speakers = [str(1001 + i) for i in range(91)]
    genders = ["M"] * 48 + ["F"] * 43
    folds = speaker_folds(speakers, genders, 5, seed=1)
    g = dict(zip(speakers, genders))
    for k in range(5):
        test = [s for s in speakers if folds[s] == k]
        assert 18 <= len(test) <= 19
        n_f = sum(g[s] == "F" for s in test)
        assert 8 <= n_f <= 9
    iem = [f"Ses0{s}{x}" for s in range(1, 6) for x in "FM"]
    f = speaker_folds(iem, [s[-1] for s in iem], 5)
    for k in range(5):
        assert sorted(s[-1] for s in iem if f[s] == k) == ["F", "M"]


def test_equal_shards_fewer_for_a_small_speaker_and_none_below_a_client():
    spk = np.array(["a"] * 25 + ["b"] * 30)
    client = shard_speakers(spk, 5)
    assert sorted(np.bincount(client[spk == "a"]).tolist()) == [5] * 5
    assert set(client[spk == "b"]) == {5, 6, 7, 8, 9}
    client = shard_speakers(spk, 10)  # a: 25 utterances make 8 clients of at least 3 (a training and a validation row)
    assert len(set(client[spk == "a"])) == 8 and np.bincount(client[spk == "a"]).min() >= 3
    assert len(set(client[spk == "b"])) == 10
    with pytest.raises(PartitionError, match="speaker 'c' has 2 utterances, fewer than the 3 a client needs"):
        shard_speakers(np.array(["c", "c"]), 1)


def test_build_federated_speaker_independent():
    rng = np.random.default_rng(0)
    rows = [dict(speaker=f"S{s}", gender="F" if s % 2 else "M", emotion=["neutral", "happy", "sad", "angry"][i % 4], corpus="iemocap")
            for s in range(10) for i in range(40)]
    m = pd.DataFrame(rows)
    data = build_federated(m, rng.normal(size=(len(m), 3)), fold=2, shards_per_speaker={"iemocap": 4})
    test_speakers = set(m.speaker[np.flatnonzero(data.split == TEST)])
    assert len(test_speakers) == 2
    assert not test_speakers & set(data.client_speaker)
    assert data.num_clients == 8 * 4
    n_val = (data.split == VAL).sum()
    n_train = (data.split == TRAIN).sum()
    assert n_val / (n_val + n_train) == pytest.approx(0.2, abs=0.01)
