"""Emo-Base extraction: dimensions, caching, atomic cache writes, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from fed_ser.data.corpora import load_iemocap
from fed_ser.features.emobase import emobase_factory
from fed_ser.features.extract import cache_path, extract_features, file_digest
from fed_ser.features.normalize import speaker_znorm


def test_extraction_caches_by_content_and_reports_bad_files(tmp_path, corpora, feature_cache):
    df, _ = load_iemocap(corpora / "iemocap")
    paths = df.path.tolist()[:6]
    good = sf.read(paths[0])[0]
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    telephone = tmp_path / "rate.wav"
    sf.write(telephone, good[::4], 4000)
    batch = paths + [str(corrupt), str(empty), str(telephone)]
    X, ok, failures = extract_features(batch, emobase_factory, feature_cache, workers=2)
    assert X.shape == (9, 988)
    assert ok.tolist() == [True] * 6 + [False] * 3
    reasons = {f.path: f.reason for f in failures}
    assert "cannot decode" in reasons[str(corrupt)]
    assert "empty audio" in reasons[str(empty)]
    assert "4000 Hz is below 8000 Hz" in reasons[str(telephone)]
    assert np.isfinite(X[:6]).all() and np.abs(X[:6]).sum() > 0

    # second pass reads the cache: identical values, even if the extractor would now differ
    ex = emobase_factory()
    target = cache_path(feature_cache, ex, file_digest(paths[0]))
    assert target.exists()
    np.save(target, np.full(988, 7.0, dtype=np.float32))
    X2, ok2, _ = extract_features(paths[:2], emobase_factory, feature_cache, workers=1)
    assert ok2.all() and (X2[0] == 7.0).all() and np.allclose(X2[1], X[1])
    # no temporary files left behind by the atomic writes
    assert not list(feature_cache.rglob("*.part"))


def test_nan_features_are_a_failure_naming_the_file(tmp_path, corpora):
    class NanExtractor:
        name, version, dim = "nan", "1", 3

        def __call__(self, wave, rate):
            return np.array([1.0, np.nan, 2.0])

    df, _ = load_iemocap(corpora / "iemocap")
    _X, ok, failures = extract_features(df.path.tolist()[:2], NanExtractor, tmp_path, workers=1)
    assert not ok.any()
    assert "NaN" in failures[0].reason and failures[0].path == df.path.iloc[0]
    # a later extraction with another extractor in worker processes is not served the NaN one
    X2, ok2, _ = extract_features(df.path.tolist()[:2], emobase_factory, tmp_path / "emo", workers=2)
    assert ok2.all() and X2.shape == (2, 988)


def test_speaker_znorm_zero_mean_unit_std_per_speaker():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(5, 3, (50, 4)), rng.normal(-2, 0.5, (40, 4))])
    spk = np.array(["a"] * 50 + ["b"] * 40)
    Z = speaker_znorm(X, spk)
    for s in "ab":
        np.testing.assert_allclose(Z[spk == s].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(Z[spk == s].std(0), 1, atol=1e-3)
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        speaker_znorm(X, spk)


def test_any_rate_and_channel_count_reaches_emobase(tmp_path, corpora):
    """EmoDB's copy is 22,050 Hz, RAVDESS 48 kHz stereo: both are read at their own rate, as mono."""
    from scipy.signal import resample_poly

    from fed_ser.data.audio import read_audio, resample

    df, _ = load_iemocap(corpora / "iemocap")
    wave, rate = sf.read(df.path.iloc[0], dtype="float32")
    assert rate == 16_000
    cd = resample_poly(wave, 441, 320).astype(np.float32)  # 22,050 Hz
    sf.write(tmp_path / "cd.wav", cd, 22_050)
    sf.write(tmp_path / "stereo.wav", np.stack([wave, 0.5 * wave], 1), 16_000)
    mono, r = read_audio(tmp_path / "stereo.wav")
    assert r == 16_000 and mono.ndim == 1 and np.allclose(mono, 0.75 * wave, atol=1e-4)
    back = resample(cd, 22_050, 16_000)
    assert abs(len(back) - len(wave)) <= 1 and np.allclose(back[1000:len(wave) - 1000], wave[1000:-1000], atol=2e-2)
    X, ok, failures = extract_features([str(tmp_path / "cd.wav"), str(tmp_path / "stereo.wav"), df.path.iloc[0]],
                                       emobase_factory, tmp_path / "cache", workers=1)
    assert ok.all(), failures
    # the same speech at another rate gives nearby functionals, not a different feature space
    assert np.corrcoef(X[0], X[2])[0, 1] > 0.95
