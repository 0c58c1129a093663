"""Defences: DP-FedSGD accounting and clipping (Opacus), UDP clipping before noise, config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from defenses.privacy.dp_fedsgd import DPConfig, PrivateGradient, noise_multiplier, planned_steps
from defenses.privacy.udp import UDPConfig, clip_update, privatize_update
from fed_ser.core.model import build_model
from fed_ser.core.training import local_update, sample_rate
from fed_ser.experiments.cli import load_config, run_settings
from fed_ser.run.client import client_update
from fed_ser.run.privacy import privacy_report
from fed_ser.run.settings import ConfigError, RunSettings


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.values()])


SIZES = [7, 20, 35, 12, 16, 140, 9, 15, 18, 11]  # two above the batch size of 20: sample rate < 1, where Opacus calibrates slowly


def _dp_settings(calibrate: str, mode: str = "sample") -> RunSettings:
    return RunSettings(prepared="x.npz", algorithm="fedsgd" if mode == "sample" else "fedavg", rounds=60,
                       fraction=0.3, dp_mode=mode, dp_epsilon=5.0, dp_delta=1e-5, dp_clip=1.0, dp_calibrate=calibrate)


def _scheduled(s: RunSettings) -> list[int]:
    from fed_ser.core.schedule import participations

    return list(participations(s.seed, s.rounds, len(SIZES), s.fraction))


def _opacus_epsilon(sigma: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(1e-5)


@pytest.mark.parametrize("calibrate", ["per_client", "expected"])
def test_reported_epsilon_is_what_opacus_accountant_computes(calibrate):
    s = _dp_settings(calibrate)
    report = privacy_report(s, SIZES, _scheduled(s))
    assert sum(c["steps"] for c in report["clients"]) == 60 * 3  # every round's selection is counted
    for n, c in zip(SIZES, report["clients"]):
        assert c["sample_rate"] == min(20, n) / n
        assert c["epsilon"] == pytest.approx(_opacus_epsilon(c["noise_multiplier"], c["sample_rate"], c["steps"]),
                                             rel=1e-9)
        # the noise was calibrated so that the calibrated number of steps spends the target
        assert 5.0 - 0.05 <= _opacus_epsilon(c["noise_multiplier"], c["sample_rate"], c["calibrated_steps"]) <= 5.0
    assert report["spent_epsilon_max"] == max(c["epsilon"] for c in report["clients"])
    # the clients use the noise multipliers the server reports for them
    for client in (2, 5):
        n = SIZES[client]
        X, y = np.random.default_rng(0).normal(size=(n, 12)).astype(np.float32), np.arange(n) % 4
        r = client_update(build_model(12, 0.0, 0), X, y, s, seed=1, client=client, num_clients=len(SIZES))
        assert r.metrics["dp-noise-multiplier"] == report["clients"][client]["noise_multiplier"]


def test_per_client_calibration_keeps_every_client_within_the_target_epsilon():
    per_client, expected = (privacy_report(_dp_settings(c), SIZES, _scheduled(_dp_settings(c)))
                            for c in ("per_client", "expected"))
    steps = [c["steps"] for c in per_client["clients"]]
    assert len(set(steps)) > 1 and max(steps) > planned_steps(60, 0.3)  # the schedule is uneven
    assert [c["calibrated_steps"] for c in per_client["clients"]] == steps
    assert per_client["spent_epsilon_max"] <= 5.0
    assert per_client["spent_epsilon_mean"] >= 5.0 - 0.05
    # planning with the expected count lets the clients selected most often overspend
    assert expected["spent_epsilon_max"] > 5.0 + 0.5


def test_dp_fedsgd_gradient_is_the_mean_of_clipped_per_sample_gradients():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 12)).astype(np.float32)
    X[3] *= 50.0  # one row with a huge gradient
    y = rng.integers(0, 4, size=20)
    clip = 0.5
    model = build_model(12, 0.0, seed=2)
    per_sample = []
    for i in range(20):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.as_tensor(X[i : i + 1])), torch.as_tensor(y[i : i + 1])).backward()
        per_sample.append(np.concatenate([p.grad.numpy().ravel() for p in model.parameters()]))
    norms = np.linalg.norm(per_sample, axis=1)
    assert norms.max() > clip  # clipping has work to do
    clipped = [g * min(1.0, clip / n) for g, n in zip(per_sample, norms)]
    assert max(np.linalg.norm(c) for c in clipped) <= clip + 1e-6

    dp = local_update(build_model(12, 0.0, seed=2), X, y, algorithm="fedsgd", dp_sgd=PrivateGradient(0.0, clip, 20), seed=3)
    np.testing.assert_allclose(_flat(dp.arrays), np.mean(clipped, axis=0), atol=1e-6)
    assert np.linalg.norm(_flat(dp.arrays)) <= clip + 1e-6
    plain = local_update(build_model(12, 0.0, seed=2), X, y, algorithm="fedsgd", seed=3)
    np.testing.assert_allclose(_flat(plain.arrays), np.mean(per_sample, axis=0), atol=1e-5)
    # with noise, the noise has the calibrated scale: sigma * clip / batch per coordinate
    noisy = local_update(build_model(12, 0.0, seed=2), X, y, algorithm="fedsgd", dp_sgd=PrivateGradient(2.0, clip, 20), seed=3)
    resid = _flat(noisy.arrays) - _flat(dp.arrays)
    assert np.std(resid) == pytest.approx(2.0 * clip / 20, rel=0.1)


def test_udp_clips_the_whole_update_before_adding_noise():
    rng = np.random.default_rng(0)
    old = {"a": rng.normal(size=(30, 20)).astype(np.float32), "b": rng.normal(size=20).astype(np.float32)}
    new = {k: v + rng.normal(scale=3.0, size=v.shape).astype(np.float32) for k, v in old.items()}
    cfg = UDPConfig(epsilon=10, delta=0.5, clip=0.25)
    clipped = clip_update(new, old, cfg.clip)
    assert np.linalg.norm(_flat(clipped)) == pytest.approx(0.25, rel=1e-6)
    direction = _flat({k: new[k] - old[k] for k in new})
    assert np.dot(_flat(clipped), direction) / (0.25 * np.linalg.norm(direction)) == pytest.approx(1.0, abs=1e-6)
    sent = privatize_update(new, old, cfg, sigma=0.01, rng=np.random.default_rng(5))
    noise = np.random.default_rng(5)
    expected = {k: old[k] + clipped[k] + noise.normal(0.0, 0.01, size=clipped[k].shape) for k in old}
    np.testing.assert_allclose(_flat(sent), _flat(expected), atol=1e-6)
    small = {k: v + 1e-4 for k, v in old.items()}  # inside the bound: left as is
    exact = {k: small[k].astype(np.float64) - old[k] for k in old}
    np.testing.assert_array_equal(_flat(clip_update(small, old, cfg.clip)), _flat(exact))


def test_dp_fedsgd_draws_poisson_batches_as_its_accountant_assumes():
    """Opacus' RDP accountant is for Poisson sampling at rate q = b / n: each row in with probability q."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 12)).astype(np.float32), np.arange(60) % 4
    sizes = [local_update(build_model(12, 0.0, 0), X, y, algorithm="fedsgd", dp_sgd=PrivateGradient(1.0, 1.0, 20), seed=s).metrics["dp-batch"]
             for s in range(300)]
    q = 20 / 60
    assert np.mean(sizes) == pytest.approx(60 * q, abs=0.6) and np.var(sizes) == pytest.approx(60 * q * (1 - q), rel=0.25)
    empty = next(r for r in (local_update(build_model(12, 0.0, 0), X[:3], y[:3], algorithm="fedsgd", batch_size=1,
                                          dp_sgd=PrivateGradient(2.0, 0.5, 1), seed=s) for s in range(50)) if r.metrics["dp-batch"] == 0)
    assert _flat(empty.arrays).std() == pytest.approx(2.0 * 0.5 / 1, rel=0.1)  # the noise alone, at its scale
    with pytest.raises(ValueError, match="divides by 7 rows"):  # the DP step and the Poisson batch must agree on b
        local_update(build_model(12, 0.0, 0), X, y, algorithm="fedsgd", dp_sgd=PrivateGradient(1.0, 1.0, 7), seed=0)


def test_privacy_report_counts_the_participations_that_happened():
    s = _dp_settings("per_client")
    scheduled = _scheduled(s)
    took_part = [max(c - 2, 0) for c in scheduled]  # some rounds short: a node was down
    planned, actual = privacy_report(s, SIZES, scheduled), privacy_report(s, SIZES, took_part)
    assert [c["steps"] for c in actual["clients"]] == took_part
    assert all(a["epsilon"] < p["epsilon"] for a, p, n in zip(actual["clients"], planned["clients"], took_part) if n < 58)
    assert "sample-level" in actual["guarantee"]


def test_a_client_calibrates_to_the_schedule_the_server_draws_from(tmp_path):
    """With fl.min_available=3 the server schedules clients 0-2 only; the clients must calibrate to it."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fed_ser.core.schedule import federation_size
    from fed_ser.data.federated import FederatedData
    from fed_ser.flower.client_app import handle_train
    from fed_ser.flower.eavesdropper import numpy_to_arrays

    rng = np.random.default_rng(0)
    n_clients = 12
    client = np.repeat(np.arange(n_clients), 10)
    data = FederatedData(X=rng.normal(size=(120, 8)).astype(np.float32), y=np.tile(np.arange(4), 30), client=client,
                         split=np.zeros(120, dtype=np.int8), client_speaker=np.array([f"s{i}" for i in range(n_clients)]),
                         client_gender=np.array(["F", "M"] * 6), client_corpus=np.array(["x"] * n_clients))
    data.save(tmp_path / "d.npz")
    s = RunSettings(prepared=str(tmp_path / "d.npz"), algorithm="fedsgd", rounds=30, fraction=0.5, dp_mode="sample",
                    dp_epsilon=5.0, min_available=3)
    n = federation_size(s.min_available, data.num_clients)
    report = privacy_report(s, [8] * n, [0] * n)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    model = build_model(8, s.dropout, s.seed)
    msg = Message(RecordDict({"arrays": numpy_to_arrays({k: v.numpy() for k, v in model.state_dict().items()}),
                              "config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    reply = handle_train(msg, ctx, s)
    sigma = float(reply.content.metric_records["metrics"]["dp-noise-multiplier"])
    assert sigma == pytest.approx(report["clients"][1]["noise_multiplier"])


def test_user_level_dp_is_accounted_against_the_server_over_the_clients_participations():
    from defenses.privacy.accounting import spent
    from defenses.privacy.user_dp import privatize

    s = _dp_settings("per_client", mode="user")
    scheduled = _scheduled(s)
    report = privacy_report(s, SIZES, scheduled)
    assert "user-level" in report["guarantee"] and "against the server" in report["guarantee"]
    for c, k in zip(report["clients"], scheduled):
        # a Gaussian mechanism of sensitivity 2C per participation: noise multiplier sigma / 2, no sampling
        assert c["epsilon"] == pytest.approx(spent(c["noise_multiplier"] / 2, 1.0, k, 1e-5), rel=1e-9)
        assert 5.0 - 0.05 <= c["epsilon"] <= 5.0  # calibrated to its own participations
    assert report["aggregate_observer_epsilon"] < report["spent_epsilon_max"]  # subsampling + summed noise
    rng = np.random.default_rng(1)
    old = {"w": rng.normal(size=(50, 40))}
    new = {"w": old["w"] + rng.normal(scale=5.0, size=(50, 40))}
    sent = privatize(new, old, clip=1.0, sigma=0.0, rng=rng)["w"] - old["w"]
    assert np.linalg.norm(sent) == pytest.approx(1.0, rel=1e-5)  # the whole update clipped to C
    noisy = privatize(new, old, clip=1.0, sigma=3.0, rng=np.random.default_rng(2))["w"] - old["w"] - sent
    assert noisy.std() == pytest.approx(3.0, rel=0.05)  # noise std sigma * C on every parameter
    udp = privacy_report(_dp_settings("per_client", mode="udp"), SIZES, scheduled)
    assert udp["guarantee"].startswith("as published, not a formal guarantee")


def test_user_level_delta_must_be_well_below_one_over_the_clients():
    from fed_ser.run.privacy import check_privacy

    s = RunSettings(prepared="x.npz", algorithm="fedavg", dp_mode="user", dp_delta=0.01)
    with pytest.raises(ConfigError, match=r"dp\.delta: 0\.01 is not well below 1/80"):
        check_privacy(s, 80)
    check_privacy(RunSettings(prepared="x.npz", algorithm="fedavg", dp_mode="user", dp_delta=1e-5), 80)


@pytest.mark.parametrize("overrides, key", [
    (["dp=sample", "dp.epsilon=0"], "dp.epsilon"),
    (["dp=sample", "dp.epsilon=-3"], "dp.epsilon"),
    (["dp=sample", "dp.delta=1.0"], "dp.delta"),
    (["dp=user", "fl=fedavg", "dp.clip=0"], "dp.clip"),
    (["dp=sample", "dp.calibrate=mean"], "dp.calibrate"),
    (["dp=sample", "fl=fedavg"], "dp.mode=sample"),
    (["dp=user", "fl=fedsgd"], "dp.mode=user"),
    (["dp=udp", "fl=fedsgd"], "dp.mode=udp"),
    (["dp.mode=central"], "dp.mode"),
])
def test_wrong_dp_settings_fail_at_start_naming_the_key(overrides, key):
    cfg = load_config(overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_settings(cfg, "x.npz", "")


def test_noise_grows_as_epsilon_shrinks():
    q, steps = sample_rate(20, 100), planned_steps(200, 0.1)
    sigmas = [noise_multiplier(DPConfig(e), q, steps) for e in (1, 5, 10, 100)]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert math.isfinite(sigmas[0]) and sigmas[-1] > 0


def _cell(mode: str, eps: float, clip: float, uar: float, asr: float, dropout: float = 0.2) -> dict:
    return {"private": "iemocap", "private_corpus": "iemocap", "algorithm": "fedsgd",
            "defence": {"dp_mode": mode, "dp_epsilon": eps, "dp_clip": clip, "dropout": dropout,
                        "spent_epsilon_max": eps if mode != "none" else None},
            "ser": {"uar": uar},
            "attacks": {"cnn": {"asr": asr, "asr_ci": [asr - 0.1, asr + 0.1], "asr_pooled": {"1": asr, "5": asr + 0.01},
                                "balanced": asr, "balanced_ci": [asr - 0.1, asr + 0.1],
                                "balanced_pooled": {"1": asr, "5": asr + 0.01}},
                        "profile": {"asr_pooled": {"1": 0.5, "10": 0.6}, "balanced_pooled": {"1": 0.5, "10": 0.6}},
                        **({"feature-space": {"asr": 0.9 if mode == "none" else 0.5, "balanced": 0.9 if mode == "none" else 0.5,
                                              "auc": 0.95}} if clip == 1.0 else {})}}


def test_defence_report_keeps_cells_that_differ_only_in_clip_apart(tmp_path):
    from fed_ser.experiments.defence_report import write_defense_report

    cells = [_cell("sample", 10.0, 5.0, 0.71, 0.52), _cell("none", 10.0, 1.0, 0.81, 0.77),
             _cell("sample", 10.0, 1.0, 0.64, 0.51), _cell("sample", 1.0, 1.0, 0.55, 0.50)]
    write_defense_report(tmp_path, cells)
    rows = [line for line in (tmp_path / "defense_report.md").read_text().splitlines()
            if line.startswith("| iemocap")]
    assert [r.split(" | ")[3:7] for r in rows] == [  # DP cells by epsilon then clip, the no-DP cell last
        ["1 (1.00)", "1", "0.2", "55.00%"], ["10 (10.00)", "1", "0.2", "64.00%"],
        ["10 (10.00)", "5", "0.2", "71.00%"], ["-", "-", "0.2", "81.00%"]]
    assert [r.rstrip(" |").split(" | ")[-1] for r in rows] == ["50.00% (0.950)", "50.00% (0.950)", "-", "90.00% (0.950)"]
    assert "clip" in (tmp_path / "defense.csv").read_text().splitlines()[0]
    assert (tmp_path / "defense.png").stat().st_size > 0
