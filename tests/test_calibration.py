"""The calibration report compares gender patterns as they are: a corpus against itself correlates
1, against itself with genders swapped -1, and the command writes its report from real audio."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from fed_ser.data.federated import build_federated
from fed_ser.data.synthetic import generate
from fed_ser.experiments.calibration import calibrate, compare, gender_pattern
from fed_ser.experiments.config import load_config
from fed_ser.run.settings import ConfigError


def _corpus(seed: int, cue: float):
    """20 speakers x 4 emotions; women's happy speech raised in feature 0 by ``cue`` (z units)."""
    rng = np.random.default_rng(seed)
    rows = [dict(corpus="emodb", speaker=f"s{s}", gender="F" if s % 2 else "M", emotion=e)
            for s in range(20) for e in ("neutral", "happy", "sad", "angry") for _ in range(10)]
    m = pd.DataFrame(rows)
    Z = rng.normal(size=(len(m), 3))
    Z[(m.gender == "F").to_numpy() & (m.emotion == "happy").to_numpy(), 0] += cue
    return build_federated(m, Z, 0, {"emodb": 2})


def test_a_corpus_matches_itself_and_its_gender_swap_is_reversed():
    data = _corpus(0, 3.0)
    swapped = replace(data, client_gender=np.where(data.client_gender == "F", "M", "F"))
    same, flipped = compare(data, data), compare(data, swapped)
    assert all(abs(r - 1) < 1e-9 for r in same["pattern_correlation"].values())
    assert all(abs(r + 1) < 1e-9 for r in flipped["pattern_correlation"].values())
    assert flipped["interaction_correlation"] == pytest.approx(-1.0)
    assert gender_pattern(data)[1, 0] > 1.0  # the happy-speech cue, women minus men
    # the probe reads the planted cue, the shuffled-gender probe does not, and a swapped corpus transfers backwards
    assert same["probe"]["real"] >= 0.8 and same["probe"]["real_shuffled"] <= 0.75
    assert flipped["transfer_synthetic_to_real"]["auc"] < 0.2 < 0.8 < same["transfer_synthetic_to_real"]["auc"]


def test_the_calibration_command_writes_its_report_from_audio(corpora, feature_cache, tmp_path):
    real = generate(tmp_path / "my-emodb", "emodb", scale=0.05, seed=1)
    base = [f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
            f"data.prepared_dir={tmp_path / 'prepared'}", "private=emodb", f"calibration.out_dir={tmp_path / 'cal'}"]
    with pytest.raises(ConfigError, match=r"data\.roots\.emodb: not set"):
        calibrate(load_config(base, "calibrate"))
    result = calibrate(load_config([*base, f"data.roots.emodb={real}"], "calibrate"))
    written = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert written["real"] == "emodb" and written["synthetic"][0] == "crema_d (synthetic)"
    assert all(-1 <= r <= 1 for r in result["pattern_correlation"].values() if r is not None)
    assert 0 <= result["probe"]["real"] <= 1 and (tmp_path / "cal" / "calibration.png").stat().st_size > 0
    assert "Transfer" in (tmp_path / "cal" / "calibration.md").read_text()
