"""The voice models: the designed voice as before, the EmoDB-calibrated one with its measured F0
shifts and level-normalised recordings, and corpora of two voices never sharing a folder."""

from dataclasses import replace

import numpy as np
import pytest

from fed_ser.data.synthetic import _stamp
from fed_ser.data.voice import sample_speaker, synthesize, utterance_prosody
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import corpus_source
from fed_ser.run.settings import ConfigError


def _pair(voice: str, style: float):
    rng = np.random.default_rng(0)
    f, m = (replace(sample_speaker(g, g, rng, style, voice), expressivity=1.0) for g in "FM")
    return f, m


def test_the_emodb_voice_shifts_f0_as_measured_on_emodb_for_both_genders():
    f, m = _pair("emodb", 1.0)
    shift = {(s.gender, e): utterance_prosody(s, e).f0_semitones for s in (f, m) for e in ("happy", "sad", "angry")}
    assert shift[("F", "happy")] == pytest.approx(7.7) and shift[("M", "happy")] == pytest.approx(5.3)
    assert shift[("F", "sad")] == pytest.approx(-1.7) and shift[("M", "sad")] == pytest.approx(1.3)
    assert shift[("F", "angry")] == pytest.approx(7.35) and shift[("M", "angry")] == pytest.approx(6.15)
    # the designed voice (default strength 2.0): men's happy F0 barely moves, unlike EmoDB's men
    f_d, m_d = _pair("designed", 2.0)
    assert utterance_prosody(m_d, "happy").f0_semitones == pytest.approx(1.3)
    assert utterance_prosody(f_d, "happy").f0_semitones == pytest.approx(4.9)


def test_the_emodb_voice_normalises_each_recordings_peak_the_designed_one_its_emotion_level():
    f, _ = _pair("emodb", 1.0)
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
    assert "voice=emodb" in _stamp("crema_d", 1.0, 0, 2.0, "emodb")
    with pytest.raises(ConfigError, match=r"data\.voice: 'timit'"):
        corpus_source(load_config(["data.voice=timit"]), "crema_d")
    with pytest.raises(ValueError, match="voice must be one of"):
        sample_speaker("x", "F", np.random.default_rng(0), 1.0, "timit")
