"""The empirical privacy audit: tight lower bounds on epsilon that stay below correct claims and catch broken mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defenses.privacy.accounting import exact_spent, gaussian_delta, gaussian_epsilon, spent, tightest_spent
from defenses.privacy.audit import audit, gdp_lower_bound, one_run_epsilon, one_run_p_value
from fed_ser.experiments.audit import WEIGHTED
from fed_ser.experiments.config import load_config

CENTRAL = "Flower central DP, server-side fixed clipping"


def _rows(overrides=()):
    from fed_ser.experiments.audit import audit_mechanisms

    return {(m.name, m.observer): m for m in audit_mechanisms(load_config(list(overrides), "audit").audit)}


def _audit(mech, trials, seed=0):
    from fed_ser.experiments.audit import audit_mechanism

    np.random.seed(seed)  # Flower's mechanisms draw from numpy's global generator
    return audit_mechanism(mech, trials, 1e-5, seed, 0.05)


# ---- accounting: the claims ----------------------------------------------------------------------------------

def test_the_exact_gaussian_account_inverts_its_delta_and_is_tighter_than_rdp():
    for mu in (0.3, 1.0, 2.0, 5.0):
        eps = gaussian_epsilon(mu, 1e-5)
        assert gaussian_delta(mu, eps) == pytest.approx(1e-5, rel=1e-6)
        assert gaussian_epsilon(mu * 1.01, 1e-5) > eps  # increasing in mu: a lower bound on mu bounds epsilon
    assert gaussian_epsilon(2.0, 1e-5) == pytest.approx(10.0, abs=0.01)  # Flower central DP, sigma 1: 10.0, RDP says 10.73
    assert exact_spent(0.5, 1, 1e-5) < spent(0.5, 1.0, 1, 1e-5)
    assert exact_spent(1.0, 4, 1e-5) == pytest.approx(gaussian_epsilon(2.0, 1e-5))  # k releases: mu sqrt(k)
    assert gaussian_epsilon(0.0, 1e-5) == 0.0 and exact_spent(1.0, 0, 1e-5) == 0.0


def test_the_exact_account_agrees_with_opacus_prv_accountant():
    from opacus.accountants import PRVAccountant

    for z, k in ((1.0, 1), (2.4, 3)):
        acc = PRVAccountant()
        acc.history = [(z, 1.0, k)]
        assert exact_spent(z, k, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
    assert tightest_spent(1.0, 0.1, 50, 1e-5) < spent(1.0, 0.1, 50, 1e-5)  # subsampled: PRV, tighter than RDP too


def test_the_claims_are_the_mechanisms_own_rdp_accounts():
    """The audit's RDP claims are what each mechanism's module reports, so the exact claim is for the same release."""
    from defenses.privacy.central import central_epsilon, local_epsilon
    from defenses.privacy.user_dp import UserDPConfig, server_epsilon, server_noise_multiplier
    from fed_ser.experiments.audit import claims

    rows = _rows()
    z = lambda name, observer="server": rows[(name, observer)].noise_multiplier
    sigma = server_noise_multiplier(UserDPConfig(2.0, 1e-5, 1.0), 1)
    assert claims(z("fed-ser user-level DP (dp=user)"), 1, 1e-5)["claimed_epsilon_rdp"] == pytest.approx(server_epsilon(sigma, 1, 1e-5))
    assert claims(z("Flower LocalDpMod (flower_dp=local)"), 1, 1e-5)["claimed_epsilon_rdp"] == pytest.approx(local_epsilon(2.0, 1e-5, 1))
    assert claims(z(CENTRAL, "observer of the aggregate"), 1, 1e-5)["claimed_epsilon_rdp"] == pytest.approx(central_epsilon(1.0, 1, 1e-5))


# ---- the estimators ------------------------------------------------------------------------------------------

def test_the_gdp_bound_holds_with_its_confidence_on_gaussian_scores():
    """Over many audits of a mu-GDP pair of score distributions the bound exceeds the truth at most ~alpha/2 of the time
    (the direction is Bonferroni-corrected), and with 2,000 runs a side it is within 0.7 of the truth."""
    rng = np.random.default_rng(0)
    mu, over = 1.0, 0
    for _ in range(400):  # scores N(3 + 2 mu, 2^2) against N(3, 2^2): mu-GDP
        r = gdp_lower_bound(rng.normal(3 + 2 * mu, 2.0, 150), rng.normal(3, 2.0, 150), 1e-5)
        over += r["mu_lower"] > mu
    assert over / 400 < 0.05
    for mu in (0.4, 2.0):
        r = gdp_lower_bound(rng.normal(0, 1, 2000), rng.normal(mu, 1, 2000), 1e-5)  # the canary lowers the score: found too
        assert 0.7 * gaussian_epsilon(mu, 1e-5) <= r["gdp_epsilon_lower_bound"] <= gaussian_epsilon(mu, 1e-5)
    assert gdp_lower_bound(np.ones(50), -np.ones(50), 1e-5)["gdp_epsilon_lower_bound"] is None  # no noise: no Gaussian fit


def test_an_audit_of_a_mechanism_that_ignores_its_input_finds_nothing():
    r = audit(lambda canary, rng: float(rng.normal()), 1000, 1e-5)
    assert r["epsilon_lower_bound"] < 0.3 and r["gdp_epsilon_lower_bound"] < 0.3
    with pytest.raises(ValueError, match="audit.trials"):
        audit(lambda canary, rng: 0.0, 5, 1e-5)


def test_the_one_run_bound_is_steinke_et_als_and_holds_for_randomised_response():
    """Without delta the p-value is the binomial tail; canaries guessed through eps-DP randomised response
    audit at or below eps; perfect scores audit high, at most what every guess right could show."""
    from scipy.stats import binom

    assert one_run_p_value(100, 40, 30, 1.0, 0.0) == pytest.approx(binom.sf(29, 40, math.exp(1) / (1 + math.exp(1))))
    assert one_run_p_value(100, 40, 30, 1.0, 1e-5) > one_run_p_value(100, 40, 30, 1.0, 0.0)
    rng = np.random.default_rng(1)
    m, eps = 2000, 1.0
    sides = rng.choice([-1, 1], m)
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    scores = np.where(truthful, sides, -sides) + 0.01 * rng.random(m)  # the best guess from an eps-DP bit
    r = one_run_epsilon(scores, sides, 1e-5)
    assert 0.5 < r["one_run_epsilon_lower_bound"] <= eps
    perfect = one_run_epsilon(sides.astype(float), sides, 1e-5)
    assert 4.0 < perfect["one_run_epsilon_lower_bound"] <= perfect["most_measurable"]
    assert one_run_epsilon(rng.normal(size=m), sides, 1e-5)["one_run_epsilon_lower_bound"] < 0.2


# ---- the mechanisms: tight below the claims, and the planted bugs ---------------------------------------------

def test_the_audit_bounds_epsilon_from_below_and_finds_no_dp(tmp_path):
    """The audited epsilon stays at or below each proven claim, and is high where nothing is noised."""
    from fed_ser.experiments.audit import run_audit

    cfg = load_config(["audit.trials=300", "audit.one_run.modes=[]", f"out_dir={tmp_path}"], "audit")
    rows = {(r["mechanism"], r["observer"]): r for r in run_audit(cfg)["rows"]}
    weighted = rows.pop((WEIGHTED, "observer of the aggregate"))
    assert weighted["gdp_epsilon_lower_bound"] > weighted["claimed_epsilon_rdp"]  # the claim assumes equal weights
    for r in rows.values():
        if r["claimed_epsilon"] is not None:
            assert r["epsilon_lower_bound"] <= r["gdp_epsilon_lower_bound"] <= r["claimed_epsilon"] < r["claimed_epsilon_rdp"], r
        else:  # no noise between the canary and this observer
            assert r["epsilon_lower_bound"] > 3.0 and r["gdp_epsilon_lower_bound"] is None, r
    assert "| no DP (clipping only) | server | none | none |" in (tmp_path / "audit.md").read_text()


@pytest.mark.parametrize("name, observer, trials", [
    ("fed-ser user-level DP (dp=user)", "server", 2000),
    ("Flower LocalDpMod (flower_dp=local)", "server", 2000),
    (CENTRAL, "observer of the aggregate", 1000),
])
def test_each_gaussian_mechanism_audits_within_0_7_of_its_exact_claim_and_never_above(name, observer, trials):
    r = _audit(_rows()[(name, observer)], trials)
    assert 0.7 * r["claimed_epsilon"] <= r["gdp_epsilon_lower_bound"] <= r["claimed_epsilon"], r
    assert r["epsilon_lower_bound"] <= r["claimed_epsilon"]


def _halve_user_dp_noise(monkeypatch):
    import fed_ser.experiments.audit as exp

    real = exp.privatize
    monkeypatch.setattr(exp, "privatize", lambda new, old, clip, sigma, rng: real(new, old, clip, sigma / 2, rng))


def _skip_user_dp_clip(monkeypatch):
    import fed_ser.experiments.audit as exp

    real, huge = exp.privatize, 1e12  # the same noise std (sigma clip), no clipping
    monkeypatch.setattr(exp, "privatize", lambda new, old, clip, sigma, rng: real(new, old, huge, sigma * clip / huge, rng))


def _halve_central_noise(monkeypatch):
    import flwr.serverapp.strategy.dp_fixed_clipping as flower_dp

    real = flower_dp.compute_stdv
    monkeypatch.setattr(flower_dp, "compute_stdv", lambda *args: real(*args) / 2)


def _skip_central_clip(monkeypatch):
    import flwr.serverapp.strategy.dp_fixed_clipping as flower_dp

    monkeypatch.setattr(flower_dp, "compute_clip_model_update", lambda param1, param2, clipping_norm: None)


@pytest.mark.parametrize("plant, name, observer", [
    (_halve_user_dp_noise, "fed-ser user-level DP (dp=user)", "server"),
    (_skip_user_dp_clip, "fed-ser user-level DP (dp=user)", "server"),
    (_halve_central_noise, CENTRAL, "observer of the aggregate"),
    (_skip_central_clip, CENTRAL, "observer of the aggregate"),
])
def test_a_planted_bug_audits_above_the_claim_and_the_correct_mechanism_below(monkeypatch, plant, name, observer):
    """Noise half what the mechanism claims, or an update never clipped: the GDP bound rises above even the RDP claim.
    The same seed and runs on the correct mechanism stay below its exact claim."""
    trials = 400
    correct = _audit(_rows()[(name, observer)], trials)
    assert correct["gdp_epsilon_lower_bound"] <= correct["claimed_epsilon"], correct
    plant(monkeypatch)
    broken = _audit(_rows()[(name, observer)], trials)
    assert broken["gdp_epsilon_lower_bound"] > broken["claimed_epsilon_rdp"] > broken["claimed_epsilon"], broken


# ---- canary clients in fed-ser's run ---------------------------------------------------------------------------

def test_a_canary_client_sends_its_update_through_user_level_dp():
    """The canary replaces the local loop only: client_update clips and noises its update as any client's."""
    import torch

    from fed_ser.core.model import build_model
    from fed_ser.experiments.audit import synthetic_federation
    from fed_ser.flower.canary import CanaryClients, with_canaries
    from fed_ser.run.client import client_update
    from fed_ser.run.settings import RunSettings

    data, canaries = with_canaries(synthetic_federation(2, 4, 8, 0), 6, 4, 10.0, seed=0)
    assert isinstance(canaries, CanaryClients) and canaries.first == 2 and data.num_clients == 8
    s = RunSettings(prepared="x.npz", algorithm="fedavg", fraction=1.0, rounds=3, dp_mode="user", dp_epsilon=4.0, dp_clip=1.0)
    model = build_model(8, 0.0, 0)
    theta = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    X, y = data.client_rows(5, 0)
    projections = []
    for seed in range(20):
        model.load_state_dict({k: torch.as_tensor(v) for k, v in theta.items()})
        r = client_update(model, X, y, s, seed, client=5, num_clients=8, local=canaries.local(5))
        u = canaries.direction(3, theta)
        projections.append(sum(float(np.sum((r.arrays[k] - theta[k]) * u[k])) for k in theta))
        assert r.metrics["dp-noise-multiplier"] > 1 and r.num_examples == 4
    # the clipped update is side * 1.0 along u; the noise along u has std sigma = the noise multiplier
    side, sigma = int(canaries.sides()[3]), r.metrics["dp-noise-multiplier"]
    assert abs(np.mean(projections) - side) < 3 * sigma / math.sqrt(20)
    assert 0.5 * sigma < np.std(projections) < 1.5 * sigma


def test_the_one_run_audit_in_a_flower_simulation_of_central_dp(tmp_path):
    """fed-ser's own simulation with 40 canary clients: the server, which sees every update before Flower's noise,
    tells every canary's side; the global models' bounds stay at or below central DP's claim."""
    from fed_ser.experiments.audit import run_audit

    cfg = load_config(["audit.trials=50", "audit.one_run.modes=[central-fixed]", "audit.one_run.canaries=40",
                       "audit.one_run.clients=2", "audit.one_run.rounds=1", f"out_dir={tmp_path}"], "audit")
    rows = {r["observer"]: r for r in run_audit(cfg)["one_run"]}
    assert rows["server"]["claimed_epsilon"] is None
    assert rows["server"]["correct"] == rows["server"]["guesses"] and rows["server"]["guesses"] >= 20
    for observer in ("aggregate", "final model"):
        r = rows[observer]
        assert r["canaries"] == 40 and r["clients"] == 42 and r["rounds"] == 1
        assert r["claimed_epsilon"] == pytest.approx(gaussian_epsilon(2.0, 1e-5), rel=1e-6)
        assert 0 < r["one_run_epsilon_lower_bound"] <= r["claimed_epsilon"]
        assert 0.3 * r["claimed_epsilon"] < r["gdp_epsilon_lower_bound"] <= r["claimed_epsilon"]  # 20 canaries a side
    assert not (tmp_path / "one_run" / "central-fixed" / "updates").exists()  # the replies are not kept
    assert "| central-fixed | server | none |" in (tmp_path / "audit.md").read_text()


@pytest.mark.parametrize("override, key", [
    ("audit.one_run.modes=[central]", "audit.one_run.modes: 'central' is not one of"),
    ("audit.one_run.canaries=1", "audit.one_run.canaries: must be >= 2"),
    ("audit.trials=5", "audit.trials: 5 runs cannot bound anything"),
    ("audit.delta=0.001", "audit.delta: 0.001 is not well below 1/508 clients"),
])
def test_a_wrong_audit_setting_is_one_line_naming_its_key_and_nothing_runs(override, key, capsys, tmp_path, monkeypatch):
    from fed_ser.experiments.audit import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([override, f"out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(f"[fed-ser] error: {key}"), err
    assert not (tmp_path / "out").exists()
