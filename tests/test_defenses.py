"""Defences: DP-FedSGD accounting and clipping (Opacus), UDP clipping before noise, config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from defenses.dp import DPConfig, noise_multiplier, planned_steps, sample_rate
from defenses.udp import UDPConfig, clip_update, privatize_update
from fed_ser.cli import load_config, run_settings
from fed_ser.model import build_model
from fed_ser.settings import ConfigError, RunSettings
from fed_ser.training import client_update, local_update, privacy_report


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.values()])


SIZES = [7, 20, 35, 60, 90, 140, 33, 48, 25, 70]


def _dp_settings(calibrate: str) -> RunSettings:
    return RunSettings(prepared="x.npz", algorithm="fedsgd", rounds=60, fraction=0.3, dp_mode="sample",
                       dp_epsilon=5.0, dp_delta=1e-5, dp_clip=1.0, dp_calibrate=calibrate)


def _opacus_epsilon(sigma: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(1e-5)


@pytest.mark.parametrize("calibrate", ["per_client", "expected"])
def test_reported_epsilon_is_what_opacus_accountant_computes(calibrate):
    s = _dp_settings(calibrate)
    report = privacy_report(s, SIZES)
    assert sum(c["steps"] for c in report["clients"]) == 60 * 3  # every round's selection is counted
    for n, c in zip(SIZES, report["clients"]):
        assert c["sample_rate"] == min(20, n) / n
        assert c["epsilon"] == pytest.approx(_opacus_epsilon(c["noise_multiplier"], c["sample_rate"], c["steps"]),
                                             rel=1e-9)
        # the noise was calibrated so that the calibrated number of steps spends the target
        assert 5.0 - 0.05 <= _opacus_epsilon(c["noise_multiplier"], c["sample_rate"], c["calibrated_steps"]) <= 5.0
    assert report["spent_epsilon_max"] == max(c["epsilon"] for c in report["clients"])
    # the clients use the noise multipliers the server reports for them
    for pid in (2, 5):
        n = SIZES[pid]
        X, y = np.random.default_rng(0).normal(size=(n, 12)).astype(np.float32), np.arange(n) % 4
        r = client_update(build_model(12, 0.0, 0), X, y, s, seed=1, pid=pid, num_clients=len(SIZES))
        assert r.metrics["dp-noise-multiplier"] == report["clients"][pid]["noise_multiplier"]


def test_per_client_calibration_keeps_every_client_within_the_target_epsilon():
    per_client, expected = (privacy_report(_dp_settings(c), SIZES) for c in ("per_client", "expected"))
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

    dp = local_update(build_model(12, 0.0, seed=2), X, y, algorithm="fedsgd", dp_sgd=(0.0, clip), seed=3)
    np.testing.assert_allclose(_flat(dp.arrays), np.mean(clipped, axis=0), atol=1e-6)
    assert np.linalg.norm(_flat(dp.arrays)) <= clip + 1e-6
    plain = local_update(build_model(12, 0.0, seed=2), X, y, algorithm="fedsgd", seed=3)
    np.testing.assert_allclose(_flat(plain.arrays), np.mean(per_sample, axis=0), atol=1e-5)
    # with noise, the noise has the calibrated scale: sigma * clip / batch per coordinate
    noisy = local_update(build_model(12, 0.0, seed=2), X, y, algorithm="fedsgd", dp_sgd=(2.0, clip), seed=3)
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


@pytest.mark.parametrize("overrides, key", [
    (["dp=sample", "dp.epsilon=0"], "dp.epsilon"),
    (["dp=sample", "dp.epsilon=-3"], "dp.epsilon"),
    (["dp=sample", "dp.delta=1.0"], "dp.delta"),
    (["dp=user", "fl=fedavg", "dp.clip=0"], "dp.clip"),
    (["dp=sample", "dp.calibrate=mean"], "dp.calibrate"),
    (["dp=sample", "fl=fedavg"], "dp.mode=sample"),
    (["dp=user", "fl=fedsgd"], "dp.mode=user"),
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
            "attacks": {"cnn": {"asr": asr, "asr_ci": [asr - 0.1, asr + 0.1], "asr_pooled": {"1": asr, "5": asr + 0.01}},
                        "profile": {"asr_pooled": {"1": 0.5, "10": 0.6}}}}


def test_defence_report_keeps_cells_that_differ_only_in_clip_apart(tmp_path):
    from fed_ser.report import write_defense_report

    cells = [_cell("sample", 10.0, 5.0, 0.71, 0.52), _cell("none", 10.0, 1.0, 0.81, 0.77),
             _cell("sample", 10.0, 1.0, 0.64, 0.51), _cell("sample", 1.0, 1.0, 0.55, 0.50)]
    write_defense_report(tmp_path, cells)
    rows = [line for line in (tmp_path / "defense_report.md").read_text().splitlines()
            if line.startswith("| iemocap")]
    assert [r.split(" | ")[3:7] for r in rows] == [  # DP cells by epsilon then clip, the no-DP cell last
        ["1 (1.00)", "1", "0.2", "55.00%"], ["10 (10.00)", "1", "0.2", "64.00%"],
        ["10 (10.00)", "5", "0.2", "71.00%"], ["-", "-", "0.2", "81.00%"]]
    assert "clip" in (tmp_path / "defense.csv").read_text().splitlines()[0]
    assert (tmp_path / "defense.png").stat().st_size > 0
