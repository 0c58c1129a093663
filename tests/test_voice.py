"""The voice models: the designed voice as before, a calibrated one with the F0 shifts it was measured
to have and level-normalised recordings, and corpora of two voices never sharing a folder."""

from dataclasses import replace

import numpy as np
import pytest

from fed_ser.data.synthetic import _stamp
from fed_ser.data.voice import calibrated_spec, check_voice, sample_speaker, synthesize, utterance_prosody
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import corpus_source
from fed_ser.run.settings import ConfigError


def _pair(voice: str, style: float):
    rng = np.random.default_rng(0)
    f, m = (replace(sample_speaker(g, g, rng, style, voice), expressivity=1.0) for g in "FM")
    return f, m


MEASURED = {"F": {"happy": 7.7, "sad": -1.7, "angry": 7.4}, "M": {"happy": 5.3, "sad": 1.3, "angry": 6.1}}
SPEC = calibrated_spec(MEASURED)


def test_a_calibrated_voice_shifts_f0_as_measured_for_both_genders():
    assert check_voice(SPEC) == check_voice(calibrated_spec(MEASURED))  # the spec is the whole voice
    f, m = _pair(SPEC, 1.0)
    shift = {(s.gender, e): utterance_prosody(s, e).f0_semitones for s in (f, m) for e in ("happy", "sad", "angry")}
    assert shift == pytest.approx({(g, e): v for g, d in MEASURED.items() for e, v in d.items()})
    # the designed voice (default strength 2.0): men's happy F0 barely moves, unlike EmoDB's men
    f_d, m_d = _pair("designed", 2.0)
    assert utterance_prosody(m_d, "happy").f0_semitones == pytest.approx(1.3)
    assert utterance_prosody(f_d, "happy").f0_semitones == pytest.approx(4.9)


def test_a_calibrated_voice_normalises_each_recordings_peak_the_designed_one_its_emotion_level():
    f, _ = _pair(SPEC, 1.0)
    f_d, _ = _pair("designed", 2.0)
    rng = np.random.default_rng(1)
    peaks = [np.abs(synthesize(f, e, rng)).max() for e in ("sad", "angry") for _ in range(3)]
    assert np.allclose(peaks, 0.5, atol=2e-3)
    rms = {e: np.mean([np.sqrt(np.mean(synthesize(f_d, e, rng) ** 2)) for _ in range(3)]) for e in ("sad", "angry")}
    assert rms["angry"] > 2 * rms["sad"]


def test_two_voices_never_share_a_folder_and_a_wrong_voice_is_named():
    designed, emodb = (load_config([f"data.voice={v}"]).data.root for v in ("designed", "emodb"))
    assert designed.endswith("style2.0") and emodb == designed + "-voice_emodb"
    assert _stamp("crema_d", 1.0, 0, 2.0) == _stamp("crema_d", 1.0, 0, 2.0, "designed")  # old corpora stay valid
    assert f"voice={SPEC}" in _stamp("crema_d", 1.0, 0, 2.0, SPEC)
    spec = corpus_source(load_config([f"data.voice='{SPEC}'"]), "crema_d")
    assert spec.voice == SPEC and spec.root.name.startswith("crema_d-")  # one folder per calibrated voice
    with pytest.raises(ConfigError, match=r"data\.voice: voice must be one of"):
        corpus_source(load_config(["data.voice=timit"]), "crema_d")
    with pytest.raises(ConfigError, match=r"data\.voice=emodb: the voice is measured on real recordings; set data\.roots\.emodb"):
        corpus_source(load_config(["data.voice=emodb"]), "crema_d")
    with pytest.raises(ValueError, match="voice must be one of"):
        sample_speaker("x", "F", np.random.default_rng(0), 1.0, "timit")
