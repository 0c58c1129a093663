"""Threat models beyond the paper's: the observer of round sums, and what Flower's DP guarantees to whom."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attacks.inference.aggregate import differencing_scores, round_aggregates
from defenses.privacy.central import central_epsilon, flower_dp_report, local_epsilon
from fed_ser.data.federated import FederatedData
from fed_ser.engines.vectorized import run_vectorized
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore
from fed_ser.run.settings import ConfigError, RunSettings


def _data(tmp_path, n_clients=12, per_client=10):
    rng = np.random.default_rng(0)
    client = np.repeat(np.arange(n_clients), per_client)
    n = n_clients * per_client
    data = FederatedData(X=rng.normal(size=(n, 8)).astype(np.float32), y=np.tile(np.arange(4), n // 4), client=client,
                         split=np.zeros(n, dtype=np.int8), client_speaker=np.array([f"s{i}" for i in range(n_clients)]),
                         client_gender=np.array(["F", "M"] * (n_clients // 2)), client_corpus=np.array(["x"] * n_clients))
    data.save(tmp_path / "d.npz")
    return data


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_a_round_sum_from_the_global_models_is_the_weighted_mean_of_the_rounds_updates(tmp_path, algorithm):
    """What SecAgg+ reveals (and any observer of the global models): the n_k-weighted mean update."""
    data = _data(tmp_path)
    s = RunSettings(prepared=str(tmp_path / "d.npz"), algorithm=algorithm, rounds=4, fraction=0.5,
                    lr=0.1 if algorithm == "fedsgd" else 0.01, optimizer="sgd", batch_size=4)
    store = UpdateStore(tmp_path / "u", mode="a")
    run_vectorized(data, s, UpdateRecorder(store, algorithm, s.lr), progress=False)
    aggs = round_aggregates(store, s.batch_size)
    assert [a.round for a in aggs] == [1, 2, 3]  # the last round's result is not in the store
    for a in aggs:
        ups = [u for u in store.updates() if u.round == a.round]
        assert a.clients == tuple(sorted(u.client for u in ups)) and len(a.clients) == 6
        w = np.array([u.num_examples for u in ups], dtype=np.float64)
        for k in a.update:
            mean = sum(wi * store.attack_input(u)[k] for wi, u in zip(w / w.sum(), ups))
            np.testing.assert_allclose(a.update[k], mean, rtol=1e-3, atol=2e-4)
        if algorithm == "fedsgd":
            assert a.batch_size == 6 * 4


def test_differencing_finds_the_clients_that_raise_the_rounds_score():
    """A round's score = its share of female clients, plus noise: the rounds a client joined tell its gender."""
    rng = np.random.default_rng(1)
    female = {c: c % 2 == 0 for c in range(20)}
    members, scores = {}, {}
    for r in range(200):
        members[r] = tuple(sorted(rng.choice(20, 5, replace=False).tolist()))
        scores[r] = float(np.mean([female[c] for c in members[r]])) + rng.normal(0, 0.05)
    p = differencing_scores(scores, members, list(range(20)))
    assert ((p > 0.5) == np.array([female[c] for c in range(20)])).all()
    flat = differencing_scores({r: 0.5 for r in scores}, members, list(range(20)))  # nothing recovered: the prior
    assert (flat == 0.5).all()


def test_central_dp_guarantees_nothing_against_the_server_and_local_dp_does():
    central = flower_dp_report("central-fixed", 1.0, 10.0, 1e-5, [0, 3, 10])
    assert central["epsilon_server"] is None
    assert central["epsilon_aggregate_observer"] == pytest.approx(central_epsilon(1.0, 10, 1e-5))
    assert central_epsilon(1.0, 3, 1e-5) < central_epsilon(1.0, 10, 1e-5) < central_epsilon(0.5, 10, 1e-5)
    local = flower_dp_report("local", 1.0, 1.0, 1e-5, [1, 4])
    assert local["epsilon_server"] == local["epsilon_aggregate_observer"] == pytest.approx(local_epsilon(1.0, 1e-5, 4))
    # one release of LocalDpMod(epsilon=1): the RDP account is no looser than the classical (1, delta) it replaces
    assert local_epsilon(1.0, 1e-5, 1) <= 1.0
    assert local_epsilon(1.0, 1e-5, 4) < 4 * 1.0  # and composes better than the sum
    assert math.isclose(local["noise_multiplier"], math.sqrt(2 * math.log(1.25 / 1e-5)))


@pytest.mark.parametrize("kwargs, key", [
    ({"flower_dp_mode": "central"}, "flower_dp.mode"),
    ({"flower_dp_mode": "local", "flower_dp_epsilon": 0.0}, "flower_dp.epsilon"),
    ({"flower_dp_mode": "central-fixed", "flower_dp_noise": 0.0}, "flower_dp.noise_multiplier"),
    ({"flower_dp_mode": "local", "dp_mode": "sample"}, "choose one DP mechanism"),
])
def test_a_wrong_flower_dp_setting_names_its_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        RunSettings(prepared="x.npz", **kwargs)


def test_flowers_dp_refuses_the_in_process_engines(tmp_path):
    from fed_ser.experiments.cli import run_vectorized_fl
    from fed_ser.experiments.config import load_config

    _data(tmp_path)
    cfg = load_config(["flower_dp=local", "fl.rounds=1"])
    with pytest.raises(ConfigError, match="Flower engine only"):
        run_vectorized_fl(cfg, tmp_path / "d.npz", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_matrix_rows_run_one_at_a_time_add_up_only_when_their_settings_match(tmp_path):
    import json

    from fed_ser.experiments.config import load_config
    from fed_ser.experiments.threats import _earlier_rows

    rows = {"a": {"rounds": 3, "fold_ids": [0], "attacks": {}}, "b": {"rounds": 5, "fold_ids": [0], "attacks": {}},
            "c": {"rounds": 3, "fold_ids": [1], "attacks": {}}}
    (tmp_path / "matrix.json").write_text(json.dumps({"rows": rows}))
    cfg = load_config(["fl.rounds=3", "folds=[0]"], "threats")
    assert list(_earlier_rows(tmp_path, cfg, {"d": []})) == ["a"]  # b: other rounds, c: other folds
    assert _earlier_rows(tmp_path, cfg, {"a": []}) == {}  # a row being rerun is not kept


def test_a_vanished_fedsgd_step_still_leaves_flowers_clipping_a_nonzero_update():
    """Flower 1.41 divides by the update's norm when it clips: a saturated model's zero step stopped a run."""
    from fed_ser.flower.client_app import one_step_model

    theta = {"w": np.full((2, 3), 1e4, np.float32), "b": np.ones(2, np.float32)}
    out = one_step_model(theta, {"w": np.full((2, 3), 1e-9), "b": np.zeros(2)}, 0.1)
    diff = np.concatenate([(theta[k] - out[k]).ravel() for k in theta])
    assert 0 < np.abs(diff).max() <= np.spacing(np.float32(1e4))  # one ulp, on one entry
    step = one_step_model(theta, {"w": np.ones((2, 3)), "b": np.ones(2)}, 0.1)
    np.testing.assert_allclose(step["b"], 0.9)
    np.testing.assert_allclose(step["w"], np.float32(1e4) - np.float32(0.1))


def test_flowers_adaptive_clipping_starts_with_a_few_clients_a_round():
    """Flower's default clipped-count noise (m/20) makes its adaptive wrapper refuse 4 clients at sigma 1."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    from fed_ser.flower.privacy import clipped_count_stddev, wrap_strategy
    from fed_ser.flower.strategy import FedSerStrategy

    with pytest.raises(ValueError, match="clipped_count_stddev"):
        DifferentialPrivacyServerSideAdaptiveClipping(FedSerStrategy(algorithm="fedsgd", lr=0.1), 1.0, 4)
    s = RunSettings(prepared="x.npz", flower_dp_mode="central-adaptive", flower_dp_noise=1.0)
    wrapped = wrap_strategy(FedSerStrategy(algorithm="fedsgd", lr=0.1, model_replies=True), s, 4)
    assert isinstance(wrapped, DifferentialPrivacyServerSideAdaptiveClipping)
    assert wrapped.clipped_count_stddev == pytest.approx(clipped_count_stddev(1.0, 4)) == pytest.approx(2**-0.5)
    assert wrapped.noise_multiplier == pytest.approx(2**0.5)  # half the budget on each release


def test_a_secagg_cell_runs_and_its_server_attacks_sums_only(corpora, feature_cache, tmp_path):
    """The matrix's SecAgg+ row at a small size: the private run goes through Flower's SecAgg+ workflow, the
    server's store holds no client update, and the only attacks are differencing on round sums (the server's
    unmasked ones and the global models'); the per-update attacks have nothing to read."""
    import json

    from fed_ser.experiments.config import load_config
    from fed_ser.experiments.threats import run_matrix

    out = tmp_path / "matrix"
    overrides = [f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                 f"data.prepared_dir={tmp_path / 'prepared'}", "shards.iemocap=2", "fl.rounds=6", "fl.eval_every=3",
                 "attack.feature_space.aggregate_ransac_draws=500", "attack.with_control=false",
                 "threats.only=[secagg]", f"out_dir={out}"]
    cells = run_matrix(load_config(overrides, "threats"), overrides)
    fold = cells["secagg"]["folds"][0]
    assert fold["secagg"] and fold["private_updates"] == 0 and fold["shadow_updates"] == 0
    assert fold["aggregate"]["rounds"] == 5  # every round whose next global model is recorded
    assert set(cells["secagg"]["attacks"]) == {"aggregate-observer", "server-sum-differencing"}
    row = json.loads((out / "matrix.json").read_text())["rows"]["secagg"]
    assert row["epsilon_server"] is None and row["epsilon_aggregate"] is None
    line = next(x for x in (out / "matrix.md").read_text().splitlines() if x.startswith("| secagg |"))
    assert line.count("n/a") == 2  # the server's CNN and profile cells: no update to read


def test_every_matrix_row_composes_into_valid_run_settings_with_its_defence_on():
    """Each row of conf/threats.yaml is a set of overrides: all of them compose, give valid run settings
    (a wrong combination, e.g. SecAgg+ with server-side clipping, would stop here naming the keys) and turn
    on what the row's name says. The SecAgg+ cell also runs end to end above; Flower's DP modes run in
    tests/test_simulation.py."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from fed_ser.experiments.cli import run_settings
    from fed_ser.experiments.config import load_config

    rows = OmegaConf.to_container(load_config([], "threats").threats.rows)
    assert {"none", "secagg", "secagg-central-dp", "dp-user-fedavg", "flower-local"} <= set(rows)
    for name, overrides in rows.items():
        s = run_settings(load_config(list(overrides), "threats"), Path("p.npz"), "out")
        assert s.secagg == name.startswith("secagg"), name
        assert (s.flower_dp_mode != "none") == (name.startswith("flower-") or name == "secagg-central-dp"), name
        assert (s.dp_mode != "none") == name.startswith("dp-"), name
        assert (s.dropout == 0.5) == name.startswith("dropout"), name
