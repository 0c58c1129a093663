"""Adversarial examples (FGSM/PGD), federated adversarial training and test-time randomisation."""

from __future__ import annotations

import pytest
import torch

from attacks.evasion.adversarial import PerturbationConfig, fgsm, perturb, pgd, robust_metrics
from defenses.evasion.adversarial_training import AdversarialBatches, AdversarialTrainingConfig
from defenses.evasion.randomization import RandomizationConfig, RandomizedModel
from fed_ser.core.model import build_model
from fed_ser.core.training import local_update
from fed_ser.data.federated import FederatedData
from fed_ser.engines.inprocess import run_inprocess
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.recording.checkpoint import load_model
from fed_ser.run.settings import ConfigError, RunSettings

EPS = 0.2  # the adversarial-training radius, and the radius its robustness is judged at


@pytest.fixture(scope="module")
def trained(corpora, feature_cache, tmp_path_factory):
    """Plain and adversarially trained FedSGD models on the same CREMA-D clients, schedule and seeds."""
    cfg = load_config([f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={tmp_path_factory.mktemp('prepared')}"])
    path = prepare(cfg, ["crema_d"], fold=0)
    data = FederatedData.load(path)
    out = tmp_path_factory.mktemp("runs")
    models = {}
    for name, mix in (("plain", 0.0), ("adversarial", 0.5)):
        s = RunSettings(prepared=str(path), algorithm="fedsgd", rounds=150, fraction=0.2, lr=0.1,
                        out_dir=str(out / name), adv_mix=mix, adv_epsilon=EPS, adv_steps=5)
        run_inprocess(data, s)
        models[name] = load_model(out / name, s)
    X, y = data.test_rows()
    return models, X, y


def _batch(n=64, d=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_zero_epsilon_leaves_inputs_and_predictions_unchanged():
    model = build_model(30, 0.0, 0).eval()
    x, y = _batch()
    for norm in ("linf", "l2"):
        assert torch.equal(fgsm(model, x, y, 0.0, norm), x)
        assert torch.equal(pgd(model, x, y, 0.0, norm=norm), x)
    trained_like = build_model(30, 0.0, 1).eval()
    m = robust_metrics(trained_like, x.numpy(), y.numpy(), PerturbationConfig("pgd", "linf", 0.0))
    assert m["acc"] == pytest.approx(float((trained_like(x).argmax(1) == y).float().mean()))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_perturbations_respect_the_norm_bound(norm, method):
    model = build_model(30, 0.0, 0).eval()
    x, y = _batch()
    eps = 0.3 if norm == "linf" else 1.5
    x_adv = perturb(model, x, y, PerturbationConfig(method, norm, eps, steps=7), torch.Generator().manual_seed(0))
    d = (x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert torch.all(size <= eps * (1 + 1e-5))
    assert size.max() > 0.9 * eps  # the attack uses its budget: it is not a no-op
    # and it raises the loss it attacks
    loss = torch.nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x), y)


def test_pgd_is_at_least_as_strong_as_fgsm_at_the_same_epsilon(trained):
    models, X, y = trained
    model = models["plain"]
    clean = robust_metrics(model, X, y, PerturbationConfig("fgsm", "linf", 0.0))["acc"]
    for eps in (0.05, 0.1, EPS):
        f = robust_metrics(model, X, y, PerturbationConfig("fgsm", "linf", eps))["acc"]
        p = robust_metrics(model, X, y, PerturbationConfig("pgd", "linf", eps, steps=10))["acc"]
        assert p <= f < clean


def test_adversarial_training_raises_robust_uar_at_its_radius_without_costing_clean_uar(trained):
    models, X, y = trained
    uar = {eps: {k: robust_metrics(models[k], X, y, PerturbationConfig("pgd", "linf", eps, steps=10))["uar"]
                 for k in ("plain", "adversarial")} for eps in (0.0, EPS)}
    print(f"UAR clean {uar[0.0]} under PGD eps={EPS} {uar[EPS]}")
    # measured on the 76-utterance CREMA-D test set: +0.13 to +0.24 under attack, clean within 0.02
    assert uar[EPS]["adversarial"] > uar[EPS]["plain"] + 0.08
    assert uar[0.0]["adversarial"] >= uar[0.0]["plain"] - 0.08


def test_adversarial_batches_are_crafted_against_the_frozen_global_model():
    x, y = _batch(40)
    model = build_model(30, 0.0, 0)
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    hook = AdversarialBatches(model, AdversarialTrainingConfig(0.5, PerturbationConfig("pgd", "linf", 0.2, 3)), seed=1)
    xb, yb = hook(model, x[:20], y[:20])
    assert torch.equal(yb, y[:20]) and torch.equal(xb[10:], x[10:20])  # the clean half is untouched
    assert 0 < (xb[:10] - x[:10]).abs().max() <= 0.2 + 1e-6
    # FedAvg's local model moves, the reference the examples are crafted against does not
    local_update(model, x.numpy(), y.numpy(), algorithm="fedavg", epochs=2, lr=0.05, batch_hook=hook)
    assert not torch.equal(model.state_dict()["dense1.weight"], theta["dense1.weight"])
    assert all(torch.equal(hook.reference.state_dict()[k], theta[k]) for k in theta)


def test_randomized_model_is_random_differentiable_and_eot_averages_gradients():
    base = build_model(30, 0.0, 0).eval()
    x, y = _batch(8)
    rnd = RandomizedModel(base, RandomizationConfig("noise", 0.5, draws=4), seed=0)
    a, b = rnd(x), rnd(x)
    assert not torch.allclose(a, b)  # a new transformation every query
    assert torch.allclose(a.exp().sum(1), torch.ones(8), atol=1e-5)  # log of averaged probabilities
    # EOT on a deterministic model is the plain attack (mean of identical gradients), to float rounding:
    # the mean of five equal float32 gradients differs from one by an ulp, ~2e-7 after the step
    cfg = PerturbationConfig("fgsm", "l2", 1.0)
    plain, eot = perturb(base, x, y, cfg), perturb(base, x, y, PerturbationConfig("fgsm", "l2", 1.0, eot_draws=5))
    assert (plain - eot).abs().max() < 1e-5
    masked = RandomizedModel(base, RandomizationConfig("mask", 0.3, draws=2), seed=0)
    xg = x.clone().requires_grad_(True)
    masked(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("key,value", [("adv_mix", 1.5), ("adv_norm", "l3"), ("adv_method", "cw"),
                                       ("adv_epsilon", -0.1), ("adv_steps", 0)])
def test_wrong_adversarial_settings_fail_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=r"adv\." + key[4:]):
        RunSettings(prepared="x.npz", **{"adv_mix": 0.5, key: value})
