"""The feature-space attack's classifier: virtual clients drawn from the attacker's speakers and the
threshold set from the attacked clients' score clusters."""

import numpy as np
import pytest

from attacks.inference.feature_space import emotion_means, train_feature_space_attack, two_means_threshold, virtual_clients


def _speakers(n_speakers: int = 6, rows: int = 40, d: int = 5, seed: int = 0):
    """Rows of speakers whose gender shows only in how emotion 1 moves feature 0 (+1 women, -1 men),
    two shards per speaker; speaker s's rows also carry s / 100 in feature 1 (to trace the rows)."""
    rng = np.random.default_rng(seed)
    X, y, client, speaker, gender = [], [], [], [], []
    for s in range(n_speakers):
        g = "F" if s % 2 == 0 else "M"
        e = rng.integers(0, 4, rows)
        x = rng.normal(0, 1, (rows, d))
        x[:, 0] += np.where(e == 1, 1.0 if g == "F" else -1.0, 0.0)
        x[:, 1] = s / 100
        X.append(x), y.append(e), speaker.append(np.full(rows, f"c/{s}"))
        client.append(2 * s + (np.arange(rows) >= rows // 2))
        gender += [g, g]
    return (np.concatenate(X), np.concatenate(y), np.concatenate(client), np.concatenate(speaker),
            np.array(gender))


def test_two_means_threshold_splits_two_clusters_wherever_they_sit():
    z = np.concatenate([np.full(5, 3.0), np.full(11, 7.0)])  # both clusters on the "female" side of 0
    t = two_means_threshold(z)
    assert 3.0 < t < 7.0 and ((z > t) == (z == 7.0)).all()
    assert two_means_threshold(np.full(4, 2.0)) == 2.0  # one value: no split, its median


def test_virtual_clients_draw_from_one_speaker_at_the_attacked_clients_sizes():
    X, y, _, speaker, _ = _speakers()
    female = {f"c/{s}": s % 2 == 0 for s in range(6)}
    shards = {s: 2 for s in female}
    rng = np.random.default_rng(1)
    F, L = virtual_clients(X, y, speaker, female, np.array([3]), shards, batch_size=20, pools=[1], draws=5, rng=rng)
    assert F.shape == (6 * 2 * 5, 4 * X.shape[1]) and L.sum() == 3 * 10
    # feature 1 of every present emotion's mean is the speaker's tag: each virtual client is one speaker's rows
    means = F.reshape(len(F), 4, -1)[:, :, 1]
    tags = np.array([m[m != 0][0] if (m != 0).any() else 0 for m in means])
    assert all(np.allclose(m[m != 0], t) for m, t in zip(means, tags))
    assert ((tags * 100).round() % 2 == 0).astype(int).tolist() == L.tolist()  # labels follow the speaker
    with pytest.raises(ValueError, match="sizes"):
        virtual_clients(X, y, speaker, female, np.array([0]), shards, 20, [1], 1, rng)


def test_virtual_clients_generalise_beyond_the_attackers_fixed_shards():
    X, y, client, speaker, gender = _speakers(n_speakers=8, rows=60, seed=2)
    Xt, yt, ct, _, gt = _speakers(n_speakers=8, rows=60, seed=3)  # new speakers, the attacked ones
    attack = train_feature_space_attack(X, y, client, gender, batch_size=20, pools=[1], draws=10, l2=0.1,
                                        speaker=speaker, sizes=np.array([10]))
    right = []
    for c in range(16):
        rows = np.flatnonzero(ct == c)[:10]
        right.append((attack.p_female(Xt[rows], yt[rows]) > 0.5) == (gt[c] == "F"))
    assert np.mean(right) >= 0.8
    with pytest.raises(ValueError, match="draws_from"):
        train_feature_space_attack(X, y, client, gender, batch_size=20, pools=[1], draws_from="shards")
    with pytest.raises(ValueError, match="speaker"):
        train_feature_space_attack(X, y, client, gender, batch_size=20, pools=[1])


def test_the_adapted_threshold_recovers_a_ranking_whose_scale_did_not_carry():
    X, y, client, speaker, gender = _speakers(seed=4)
    attack = train_feature_space_attack(X, y, client, gender, batch_size=20, pools=[1], draws=5,
                                        speaker=speaker, sizes=np.array([20]))
    women, men = np.full(8, 0.97), np.full(8, 0.7)  # every score above 0.5: the fixed threshold calls all female
    adapted = attack.adapted(np.concatenate([women, men]))
    shifted = lambda p: 1 / (1 + np.exp(-(np.log(p / (1 - p)) - adapted.offset)))
    assert (shifted(women) > 0.5).all() and (shifted(men) < 0.5).all()
    Xc, yc = X[client == 0], y[client == 0]
    p, q = attack.p_female(Xc, yc), adapted.p_female(Xc, yc)
    assert np.isclose(np.log(q / (1 - q)), np.log(p / (1 - p)) - adapted.offset)
    assert adapted.p_female(X[:0], y[:0]) == attack.prior  # nothing recovered: still the prior
    assert np.allclose(emotion_means(Xc, yc).shape, (4 * X.shape[1],))


def test_the_control_relabels_speakers_never_splitting_one():
    from attacks.inference.base import AttackerData
    from fed_ser.core.statistics import speaker_labellings

    speakers = np.repeat([f"c/s{i}" for i in range(6)], 3)  # 6 speakers, 3 clients each
    data = AttackerData(X=np.zeros((18, 2)), y=np.zeros(18, np.int64), client=np.arange(18), client_speaker=speakers,
                        client_female=np.repeat([True, False] * 3, 3))
    labellings = speaker_labellings(data.speaker_female(), 99)
    assert len(labellings) == 18  # C(6, 3) - the truth - its inverse
    for female in labellings:
        g = data.relabelled(female).client_female.reshape(6, 3)
        assert (g == g[:, :1]).all() and g[:, 0].sum() == 3  # one label a speaker, the same mix
    assert len({tuple(data.relabelled(f).client_female) for f in labellings}) == 18


def test_signal_probes_tell_a_signal_kept_from_one_lost_by_the_inversion():
    from fed_ser.experiments.signal import signal_probes

    rng = np.random.default_rng(5)
    speaker = np.repeat([f"c/{i}" for i in range(10)], 4)
    label = np.repeat(np.arange(10) % 2, 4)
    true = rng.normal(0, 1, (40, 8))
    true[:, 0] += 3 * (2 * label - 1)  # gender readable from the client's own statistics
    lost = rng.normal(0, 1, (40, 8))  # what an inversion that recovered nothing useful would hand on
    sig = signal_probes([{"true": true[:20], "recovered": lost[:20], "label": label[:20], "speaker": speaker[:20]},
                         {"true": true[20:], "recovered": lost[20:], "label": label[20:], "speaker": speaker[20:]}])
    assert sig["probe_true"] >= 0.95 and sig["probe_recovered"] <= 0.75
    assert sig["clients"] == 40 and sig["speakers"] == 10
