"""The attack on recorded FedSGD updates: it learns gender from real gradients, and a control
with shuffled shadow genders falls to chance (so ids or ordering cannot carry the attack)."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.inference.data import UpdateDataset, labelled_updates
from attacks.inference.evaluate import attack_success_rate
from attacks.inference.profile import input_profile, profile_asr, train_profile_attack, update_profiles
from attacks.inference.train import AttackConfig, predict, train_attack
from fed_ser.data.federated import FederatedData
from fed_ser.data.synthetic import generate
from fed_ser.engines.vectorized import run_vectorized
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore
from fed_ser.run.settings import RunSettings

ROUNDS = 30
SCALE = 0.25  # at the shared fixtures' 5% a client holds ~7 utterances: too few for the gender cue (ASR ~0.6)


@pytest.fixture(scope="module")
def stores(feature_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack")
    root = tmp_path_factory.mktemp("attack-corpora")
    for corpus in ("crema_d", "iemocap", "msp_improv"):
        generate(root / corpus, corpus, scale=SCALE, seed=3)  # the default gender_style, as users get it
    cfg = load_config([f"data.root={root}", f"data.scale={SCALE}", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={tmp}", "shards.iemocap=2", "shards.msp_improv=2"])
    out = {}
    for name, corpora_, share in (("private", ["iemocap"], 1.0), ("shadow", ["crema_d", "msp_improv"], 0.8)):
        path = prepare(cfg, corpora_, fold=0, train_share=share, tag=name)
        data = FederatedData.load(path)
        store = UpdateStore(tmp / name, mode="a")
        s = RunSettings(prepared=str(path), algorithm="fedsgd", rounds=ROUNDS, fraction=0.3, lr=0.1)
        run_vectorized(data, s, UpdateRecorder(store, "fedsgd", 0.1), progress=False)
        out[name] = (store, data)
    return out


CFG = AttackConfig(layers=["dense1", "dense2", "out"], max_epochs=4, patience=10, pools=(4, 4, 4), first_stride=4, seed=0)


def _asr(stores, shadow_labels=None):
    s_store, s_data = stores["shadow"]
    ups, labels = labelled_updates(s_store, s_data.client_gender)
    if shadow_labels is not None:
        labels = shadow_labels(ups, labels)
    trained = train_attack(s_store, ups, labels, CFG, progress=False)
    p_store, p_data = stores["private"]
    p_ups, p_labels = labelled_updates(p_store, p_data.client_gender)
    fused, per_layer = predict(trained.model, UpdateDataset(p_store, p_ups, p_labels, CFG.layers, trained.stats))
    clients = np.array([u.client for u in p_ups])
    asr = {k: attack_success_rate(fused, clients, p_labels, pool_rounds=k) for k in (1, 5)}
    return asr, {l: attack_success_rate(v, clients, p_labels) for l, v in per_layer.items()}


def _relabelled(stores, ups) -> np.ndarray:
    """Shadow update labels under a relabelling of the shadow speakers (the control's: a speaker's clients
    keep one label, never the true labelling or its inverse)."""
    from fed_ser.core.statistics import speaker_labellings
    from fed_ser.experiments.evaluation import client_speakers

    data = stores["shadow"][1]
    speaker = client_speakers(data)
    female = speaker_labellings({s: g == "F" for s, g in zip(speaker, data.client_gender)}, 1, seed=5)[0]
    return np.array([int(female[speaker[u.client]]) for u in ups])


def test_store_holds_sampled_clients_times_rounds(stores):
    store, data = stores["private"]
    assert len(store) == ROUNDS * int(data.num_clients * 0.3)


def test_attack_infers_gender_and_control_is_at_chance(stores):
    asr, per_layer = _asr(stores)
    print(f"ASR {asr} per layer {per_layer}")

    control, _ = _asr(stores, lambda ups, labels: _relabelled(stores, ups))
    print(f"control ASR {control}")
    # measured: 0.95 single update, 1.0 pooled over 5 rounds; control 0.51 / 0.53
    assert asr[1] >= 0.75 and asr[5] >= 0.8
    assert per_layer["dense1"] > per_layer["out"]  # the first layer leaks most
    assert abs(control[1] - 0.5) <= 0.1 and abs(control[5] - 0.5) <= 0.15


def test_asr_definition():
    clients = np.repeat(np.arange(4), 5)
    labels = np.array([1, 1, 0, 0]).repeat(5)
    p = np.where(labels == 1, 0.9, 0.1)
    assert attack_success_rate(p, clients, labels) == 1.0
    assert attack_success_rate(1 - p, clients, labels) == 0.0
    p[clients == 0] = 0.2  # one client always wrong -> 3 of 4 clients right
    assert attack_success_rate(p, clients, labels, pool_rounds=3) == 0.75


def _profile_asr(stores, noise_std: float = 0.0, shuffle: bool = False, pools=(1, 5)) -> dict[int, float]:
    """The input-profile attack on the same recorded updates; ``noise_std`` adds to every weight
    element what DP noise would (summed over the layer's output units: std * sqrt(out))."""
    rng = np.random.default_rng(11)
    (s_store, s_data), (p_store, p_data) = stores["shadow"], stores["private"]
    s_ups, s_labels = labelled_updates(s_store, s_data.client_gender)
    p_ups, p_labels = labelled_updates(p_store, p_data.client_gender)
    s_prof, p_prof = update_profiles(s_store, s_ups), update_profiles(p_store, p_ups)
    assert np.allclose(p_prof[0], p_store.read(p_ups[0])["dense1.weight"].sum(0), atol=1e-5)
    out_units = p_ups[0].layers["dense1.weight"][0]
    s_prof = s_prof + rng.normal(0, noise_std * np.sqrt(out_units), s_prof.shape)
    p_prof = p_prof + rng.normal(0, noise_std * np.sqrt(out_units), p_prof.shape)
    if shuffle:  # the shadow speakers relabelled, a speaker's clients together, as the experiment's control
        s_labels = _relabelled(stores, s_ups)
    attack = train_profile_attack(s_prof, s_labels)
    clients = np.array([u.client for u in p_ups])
    return {k: profile_asr(attack, p_prof, clients, p_labels, pool_rounds=k) for k in pools}


def test_profile_attack_infers_gender_falls_with_noise_and_pooling_averages_noise(stores):
    clean = _profile_asr(stores)
    control = _profile_asr(stores, shuffle=True)
    rms = float(np.sqrt(np.mean([np.mean(stores["private"][0].read(u)["dense1.weight"] ** 2)
                                 for u in stores["private"][0].updates()[:20]])))
    noisy = _profile_asr(stores, noise_std=3 * rms, pools=(1, 5, 9))
    drowned = _profile_asr(stores, noise_std=1e4 * rms)
    print(f"profile ASR clean {clean} control {control} noisy {noisy} drowned {drowned}")
    assert clean[1] >= 0.65 and clean[5] >= clean[1]
    assert abs(control[1] - 0.5) <= 0.15
    assert noisy[1] < clean[1] and noisy[9] > noisy[1]  # pooled rounds average noise away
    assert abs(drowned[1] - 0.5) <= 0.15


def test_input_profile_of_a_dense_gradient_is_the_weighted_input_sum():
    rng = np.random.default_rng(0)
    delta, x = rng.normal(size=(6, 3)), rng.normal(size=(6, 5))  # 6 samples, 3 units, 5 inputs
    assert np.allclose(input_profile(delta.T @ x), delta.sum(1) @ x)
    with pytest.raises(ValueError, match="2-D"):
        input_profile(np.zeros(4))


def test_attack_precision_is_checked_and_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from attacks.inference import train

    assert train.resolve_precision("float32") == torch.float32
    with pytest.raises(ValueError, match="attack.precision"):
        train.resolve_precision("float16")
    monkeypatch.setattr(train, "native_bfloat16", lambda: False)
    assert train.resolve_precision("auto") == torch.float32
    with pytest.raises(ValueError, match="no native bfloat16"):
        train.resolve_precision("bfloat16")
    monkeypatch.setattr(train, "native_bfloat16", lambda: True)
    assert train.resolve_precision("auto") == torch.bfloat16


def test_pooling_before_the_relu_computes_what_relu_then_pooling_does():
    """The attack CNN pools before its ReLU (a smaller map to rectify): values and gradients are the same."""
    import torch

    from attacks.inference.model import LayerAttack

    torch.manual_seed(0)
    net = LayerAttack((64, 96), 64, channels=(4, 8, 8), kernel=3, pools=(2, 4, 4), dropout=0.0).eval()
    x = torch.randn(3, 1, 64, 96)
    blocks = list(net.cnn)
    swapped = []
    for i, m in enumerate(blocks):  # the published order: ReLU, then max-pooling
        if isinstance(m, torch.nn.MaxPool2d):
            swapped += [blocks[i + 1], m]
        elif not (isinstance(m, torch.nn.ReLU) and i > 0 and isinstance(blocks[i - 1], torch.nn.MaxPool2d)):
            swapped.append(m)
    reference = torch.nn.Sequential(*swapped)
    assert [type(m) for m in reference].index(torch.nn.ReLU) < [type(m) for m in reference].index(torch.nn.MaxPool2d)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = net.cnn(a), reference(b)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(a.grad, b.grad)
