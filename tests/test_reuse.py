"""A finished FL run is reused only by a run with the same settings (issue: stale results)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fed_ser.experiments.config import load_config

#: Every setting that changes what a recorded FL run holds (or the SER numbers read from it).
SETTINGS = [
    "seed=1", "data.seed=4", "data.gender_style=1.0", "data.scale=0.03", "shards.iemocap=3", "fold=1",
    "model.dropout=0.4", "fl.lr=0.05", "fl.batch_size=10", "fl.fraction=0.5", "fl.local_epochs=2",
    "fl.eval_every=1", "fl.eval_fraction=0.5", "fl.secagg=true", "recorder.layers=dense1", "recorder.float16=true",
    "dp=sample", "dp=sample dp.epsilon=5", "dp=sample dp.clip=2", "dp=sample dp.delta=1e-6",
    "dp=sample dp.calibrate=expected", "adv=pgd", "adv=pgd adv.epsilon=0.3", "private_engine=vectorised",
    "shadow.share=0.5", "shadow.mode=speakers", "shadow.corpora=[crema_d]",
]


class _Summary:
    """Four numbers a waveform, in openSMILE's place: a run's key is made of settings and the prepared data's
    name, never of what a feature is, so the data sets are built from the real corpora without the extraction."""

    name, version, dim = "summary", "1", 4

    def __call__(self, wave: np.ndarray, rate: int) -> np.ndarray:
        return np.array([wave.mean(), wave.std(), np.abs(wave).max(), len(wave) / rate])


def _summary() -> _Summary:
    return _Summary()


@pytest.fixture()
def cell(tmp_path, monkeypatch):
    """An experiment whose FL runs are stubs that only record that they ran (and where)."""
    import fed_ser.experiments.prepare as prepare
    import fed_ser.experiments.threat_model as experiment

    monkeypatch.setattr(prepare, "feature_factory", lambda features: _summary)
    ran = []

    def fake_run(cfg, prepared, out_dir, recorder_dir=""):
        ran.append(Path(out_dir))
        res = {"final": {"round": int(cfg.fl.rounds)}, "settings": {}}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(experiment, "run_fl", fake_run)
    monkeypatch.setattr(experiment, "run_vectorized_fl", fake_run)
    synthetic = str(tmp_path / "corpora") + "/scale${data.scale}-seed${data.seed}-style${data.gender_style}"
    base = [f"data.root={synthetic}", "data.scale=0.02", "data.seed=3", f"data.cache={tmp_path / 'cache'}", "data.workers=1",
            f"data.prepared_dir={tmp_path / 'prepared'}", "shards.iemocap=2", "shards.msp_improv=2", "fl.rounds=3",
            f"out_dir={tmp_path / 'cell'}"]

    def train(*overrides: str) -> list[Path]:
        """The FL runs (private, shadow) the experiment trains for these overrides; [] = both reused."""
        cfg = load_config(base + [o for x in overrides for o in x.split()], "experiment")
        tm = experiment.threat_model(cfg, int(cfg.fold))
        n = len(ran)
        experiment.train_recorded(cfg, tm.private_data, Path(cfg.out_dir) / f"fold{cfg.fold}", "private", str(cfg.private_engine))
        experiment.train_recorded(cfg, tm.shadow_data, Path(cfg.out_dir) / f"fold{cfg.fold}", "shadow", str(cfg.shadow.engine))
        return ran[n:]

    return train


def test_changing_any_setting_that_defines_a_run_never_reuses_the_old_run(cell):
    first = cell()
    assert len(first) == 2 and cell() == []  # the same settings again: both runs reused
    for setting in SETTINGS:
        fl = "fl=fedavg " if "local_epochs" in setting else ""
        if "dp=user" in setting:
            fl = "fl=fedavg "
        runs = cell(fl + setting)
        assert runs, f"{setting}: the finished runs were reused"
        assert not set(runs) & set(first), f"{setting}: a run of other settings was written over"
    assert cell("fl.round_timeout=5") == []  # operational settings do not define a run


def test_folds_share_one_shadow_federation_and_attack_unless_per_fold(corpora, feature_cache, tmp_path, monkeypatch):
    """The folds split the private corpus's speakers; the attacker's corpora do not depend on them. By
    default fold 1 evaluates the shadow federation and the CNN of fold 0 (trained once); with
    shadow.per_fold=true it trains its own. Fold 0's results are the same either way."""
    import attacks.inference.cnn as cnn
    import fed_ser.experiments.attack as experiment

    trained = []
    real = cnn.train_attack
    monkeypatch.setattr(cnn, "train_attack", lambda store, *a, **k: trained.append(store.path) or real(store, *a, **k))
    base = [f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
            f"data.prepared_dir={tmp_path / 'prepared'}", "shards.iemocap=2", "shards.msp_improv=2", "fl.rounds=4",
            "private_engine=vectorised", "attack.max_epochs=1", "attack.feature_space.enabled=false",
            "attack.with_control=false", "folds=[0,1]"]
    res = {}
    for per_fold in ("false", "true"):
        out = tmp_path / f"per-fold-{per_fold}"
        n = len(trained)
        experiment.main(base + [f"shadow.per_fold={per_fold}", f"out_dir={out}"])
        res[per_fold] = json.loads((out / "results.json").read_text())
        shadow_runs = sorted(p.relative_to(out).parts[0] for p in out.glob("fold*/shadow-*"))
        folds = res[per_fold]["folds"]
        if per_fold == "false":
            assert len(trained) - n == 1 and shadow_runs == ["fold0"]
            assert [f["shadow_fold"] for f in folds] == [0, 0]
            assert folds[0]["attack_fits"]["cnn"] == folds[1]["attack_fits"]["cnn"]
            assert "serve every fold" in (out / "report.md").read_text()
        else:
            assert len(trained) - n == 2 and shadow_runs == ["fold0", "fold1"]
            assert [f["shadow_fold"] for f in folds] == [0, 1]
        assert folds[0]["private_updates"] and folds[1]["private_updates"]
    same, own = res["false"]["folds"], res["true"]["folds"]
    assert same[0]["attacks"] == own[0]["attacks"] and same[0]["attack_fits"] == own[0]["attack_fits"]
    assert same[1]["attacks"] != own[1]["attacks"]  # fold 1 attacked with another shadow federation's CNN
