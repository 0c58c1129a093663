"""A finished FL run is reused only by a run with the same settings (issue: stale results)."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.fixture()
def cell(feature_cache, tmp_path, monkeypatch):
    """An experiment whose FL runs are stubs that only record that they ran (and where)."""
    import fed_ser.experiments.attack as experiment

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
    base = [f"data.root={synthetic}", "data.scale=0.02", "data.seed=3", f"data.cache={feature_cache}",
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
