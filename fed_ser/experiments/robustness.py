"""One-command robustness report: plain FL vs federated adversarial training vs + test-time randomisation.

``fed-ser-robust dataset=crema_d fl=fedsgd adv.epsilon=0.1`` trains the SER model twice on the
same clients, schedule and seeds (plain FL, and FL with adversarial training, ``conf/adv/pgd.yaml``),
then attacks both on the fold's held-out speakers with FGSM and PGD over ``robust.epsilons``:

- ``plain`` and ``adversarial``: white-box attacks on the model itself;
- ``adversarial+random``: the adversarially trained model behind test-time randomisation, attacked
  adaptively (PGD/FGSM with expectation over transformation through the randomised model) and
  statically (examples crafted on the bare model); its robust UAR is the worse of the two.

Results: ``<out_dir>/robust.json``, ``robust.csv``, ``robust_report.md`` and ``robust.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from attacks.evasion.adversarial import PerturbationConfig, robust_metrics
from defenses.evasion.randomization import RandomizationConfig, RandomizedModel
from fed_ser.core.metrics import evaluate
from fed_ser.data.federated import FederatedData
from fed_ser.experiments.cli import expand_overrides, load_config, run_fl, run_settings
from fed_ser.experiments.defence_report import write_robust_report
from fed_ser.experiments.prepare import prepare
from fed_ser.io import atomic_write_json, atomic_write_text
from fed_ser.recording.checkpoint import NAME as CHECKPOINT
from fed_ser.recording.checkpoint import load_checkpoint, load_model

ENGINES = ("flower", "inprocess")


def _train(cfg: DictConfig, prepared: Path, out: Path, adversarial: bool):
    """Train (or reuse) one FL run, plain or adversarial; return its final global model."""
    cfg = cfg.copy()
    if not adversarial:
        cfg.adv.mix = 0.0
    engine = str(cfg.robust.engine)
    if engine not in ENGINES:
        raise ValueError(f"robust.engine: {engine!r} is not one of {ENGINES}")
    s = run_settings(cfg, prepared, str(out))
    ckpt = out / CHECKPOINT
    if not ckpt.exists() or load_checkpoint(ckpt, s)[0] != s.rounds:  # Flower resumes an unfinished run
        if engine == "flower":
            run_fl(cfg, prepared, str(out))
        else:
            from fed_ser.engines.inprocess import run_inprocess

            run_inprocess(FederatedData.load(prepared), s)
    return load_model(out, s)


def _attacks(cfg: DictConfig) -> list[tuple[str, float]]:
    methods, epsilons = list(cfg.robust.attacks), [float(e) for e in cfg.robust.epsilons]
    if not epsilons or any(e < 0 for e in epsilons):
        raise ValueError(f"robust.epsilons: need a non-empty list of values >= 0, got {epsilons}")
    return [(m, e) for m in methods for e in epsilons]


def run_robustness(cfg: DictConfig) -> dict:
    """Train plain and adversarial FL on one corpus and fold; attack both; write the report."""
    if float(cfg.adv.mix) <= 0:
        raise ValueError("adv.mix: the robustness report needs adversarial training on (adv=pgd, adv.mix > 0)")
    r = cfg.robust
    rand = RandomizationConfig(str(r.randomization.transform), float(r.randomization.strength), int(r.randomization.draws))
    attacks = _attacks(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    t0 = time.perf_counter()
    prepared = prepare(cfg, [cfg.dataset.name], int(cfg.fold))
    plain = _train(cfg, prepared, out / "plain", adversarial=False)
    adv = _train(cfg, prepared, out / "adversarial", adversarial=True)
    t_train = time.perf_counter() - t0
    X, y = FederatedData.load(prepared).test_rows()
    if int(r.max_test) > 0:
        X, y = X[: int(r.max_test)], y[: int(r.max_test)]
    randomized = RandomizedModel(adv, rand, seed=int(cfg.seed)).eval()
    models = {"plain": plain, "adversarial": adv, "adversarial+random": randomized}
    rows = []
    for name, model in models.items():
        clean = evaluate(model, X, y)
        for method, eps in attacks:
            base = dict(method=method, norm=str(r.norm), epsilon=eps, steps=1 if method == "fgsm" else int(r.pgd_steps),
                        random_start=method == "pgd")
            if name == "adversarial+random":
                adaptive = robust_metrics(randomized, X, y, PerturbationConfig(**base, eot_draws=int(r.eot_draws)),
                                          seed=int(cfg.seed))
                static = robust_metrics(adv, X, y, PerturbationConfig(**base), target=randomized, seed=int(cfg.seed))
                worst = min(adaptive, static, key=lambda m: m["uar"])
                extra = {"adaptive_uar": adaptive["uar"], "static_uar": static["uar"]}
            else:
                worst, extra = robust_metrics(model, X, y, PerturbationConfig(**base), seed=int(cfg.seed)), {}
            rows.append({"model": name, "attack": method, "norm": str(r.norm), "epsilon": eps, "clean_uar": clean["uar"],
                         "robust_uar": worst["uar"], "robust_acc": worst["acc"], **extra})
            print(f"[robust] {name:<19} {method} eps {eps:<5g} clean UAR {clean['uar']:.3f} "
                  f"robust UAR {worst['uar']:.3f}", flush=True)
    result = {"dataset": cfg.dataset.name, "algorithm": cfg.fl.algorithm, "fold": int(cfg.fold), "test_utterances": len(y),
              "adversarial_training": OmegaConf.to_container(cfg.adv), "randomization": OmegaConf.to_container(r.randomization),
              "eot_draws": int(r.eot_draws), "rows": rows,
              "seconds": {"training": t_train, "total": time.perf_counter() - t0}}
    atomic_write_json(out / "robust.json", result)
    write_robust_report(out, result)
    print(f"[fed-ser] robustness report: {out / 'robust_report.md'}  figure: {out / 'robust.png'}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-robust [-m] key=value ...`` (conf/robust.yaml)."""
    _, runs = expand_overrides(list(sys.argv[1:] if argv is None else argv))
    for overrides in runs:
        run_robustness(load_config(overrides, "robust"))


if __name__ == "__main__":
    main()
