"""Loaders on synthetic trees laid out like the real corpora, including their label syntax."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf

from fed_ser.data.corpora import CorpusError, load_crema_d, load_iemocap, load_msp_improv
from fed_ser.data.synthetic import generate


def test_crema_d_speakers_genders_and_emotions(corpora):
    df, issues = load_crema_d(corpora / "crema_d")
    assert issues == []
    assert df.speaker.nunique() == 91
    assert df.groupby("gender").speaker.nunique().to_dict() == {"F": 43, "M": 48}
    assert set(df.emotion) == {"neutral", "happy", "sad", "angry"}
    # fear/disgust files exist on disk but are not in the manifest
    on_disk = {p.stem.split("_")[2] for p in (corpora / "crema_d" / "AudioWAV").glob("*.wav")}
    assert {"FEA", "DIS"} & on_disk
    assert not df.utt_id.str.contains("_FEA_|_DIS_").any()


def test_iemocap_improvised_only_exc_merged_speaker_from_turn(corpora):
    root = corpora / "iemocap"
    df, issues = load_iemocap(root)
    assert issues == []
    assert sorted(df.speaker.unique()) == [f"Ses0{s}{g}" for s in range(1, 6) for g in "FM"]
    assert df.utt_id.str.contains("_impro").all()
    assert any(root.glob("Session*/dialog/EmoEvaluation/*_script*.txt"))  # scripted dialogs exist on disk
    # the turn letter, not the dialog letter, names the speaker
    row = df[df.utt_id.str.startswith("Ses01F_impro") & df.utt_id.str.contains("_M0")].iloc[0]
    assert row.speaker == "Ses01M" and row.gender == "M"
    labels = "".join(p.read_text() for p in root.glob("Session*/dialog/EmoEvaluation/*impro*.txt"))
    n_exc = labels.count("\texc\t")
    assert n_exc > 0  # exc utterances are present in the labels and counted as happy
    assert (df.emotion == "happy").sum() >= n_exc


def test_msp_improv_drops_read_condition_and_other_labels(corpora):
    root = corpora / "msp_improv"
    df, issues = load_msp_improv(root)
    assert issues == []
    assert df.speaker.nunique() == 12 and set(df.gender) == {"F", "M"}
    conditions = df.session.str.split(":").str[1]
    assert set(conditions) <= {"T", "S"}
    text = (root / "Evaluation.txt").read_text()
    assert "-R-" in text or "-P-" in text  # such utterances exist but are dropped
    assert not df.utt_id.str.contains("-R-|-P-").any()


def test_generation_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", "iemocap", scale=0.01, seed=5)
    b = generate(tmp_path / "b", "iemocap", scale=0.01, seed=5, workers=1)
    fa = sorted(p.relative_to(a) for p in a.rglob("*.wav"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.wav"))
    wa, _ = sf.read(a / fa[0])
    wb, _ = sf.read(b / fa[0])
    np.testing.assert_array_equal(wa, wb)


def test_bad_labels_are_reported_with_the_file_and_the_rest_loads(tmp_path, corpora):
    root = tmp_path / "crema_d"
    shutil.copytree(corpora / "crema_d", root)
    wav = next((root / "AudioWAV").glob("1001_*.wav"))
    shutil.copy(wav, root / "AudioWAV" / "1001_IEO_XYZ_HI.wav")  # unknown emotion code
    shutil.copy(wav, root / "AudioWAV" / "1999_IEO_ANG_HI.wav")  # actor without demographics
    df, issues = load_crema_d(root)
    reasons = {i.path.split("/")[-1]: i.reason for i in issues}
    assert "unknown emotion code 'XYZ'" in reasons["1001_IEO_XYZ_HI.wav"]
    assert "speaker 1999 has no Sex" in reasons["1999_IEO_ANG_HI.wav"]
    assert df.speaker.nunique() == 91

    (root / "VideoDemographics.csv").unlink()
    with pytest.raises(CorpusError, match="VideoDemographics.csv"):
        load_crema_d(root)


def test_iemocap_missing_audio_and_unknown_code(tmp_path, corpora):
    root = tmp_path / "iemocap"
    shutil.copytree(corpora / "iemocap", root)
    label = next(root.glob("Session1/dialog/EmoEvaluation/*impro*.txt"))
    text = label.read_text()
    first = next(line for line in text.splitlines() if line.startswith("["))
    utt = first.split("\t")[1]
    label.write_text(text.replace(first, first.replace(f"\t{first.split(chr(9))[2]}\t", "\tzzz\t")))
    other = next(line for line in label.read_text().splitlines() if line.startswith("[") and utt not in line)
    missing = other.split("\t")[1]
    next(root.glob(f"Session1/sentences/wav/*/{missing}.wav")).unlink()
    df, issues = load_iemocap(root)
    text_issues = " ".join(f"{i.path} {i.reason}" for i in issues)
    assert f"{utt}: unknown emotion code 'zzz'" in text_issues
    assert f"{missing}.wav" in text_issues and "missing" in text_issues
    assert utt not in set(df.utt_id) and missing not in set(df.utt_id)
    assert len(df) > 0


def test_msp_missing_label_file(tmp_path):
    (tmp_path / "session1").mkdir()
    with pytest.raises(CorpusError, match="Evaluation.txt"):
        load_msp_improv(tmp_path)


def test_ensure_corpus_reuses_a_match_and_refuses_to_mix(tmp_path):
    from fed_ser.data.synthetic import ensure_corpus

    root = ensure_corpus(tmp_path / "iemocap", "iemocap", scale=0.01, seed=1)
    before = sorted(p.name for p in root.rglob("*.wav"))
    assert ensure_corpus(root, "iemocap", scale=0.01, seed=1) == root  # reused, not rewritten
    with pytest.raises(FileExistsError, match="scale=0.01 seed=1"):
        ensure_corpus(root, "iemocap", scale=0.02, seed=1)
    with pytest.raises(FileExistsError, match="gender_style=0.0"):  # same scale and seed, other voices
        ensure_corpus(root, "iemocap", scale=0.01, seed=1, gender_style=0.0)
    assert sorted(p.name for p in root.rglob("*.wav")) == before


def test_gender_style_scales_only_the_gender_by_emotion_interaction():
    from fed_ser.data.voice import EMOTIONS, sample_speaker, utterance_prosody

    rng = np.random.default_rng(0)
    f, m = sample_speaker("F1", "F", rng, gender_style=0.0), sample_speaker("M1", "M", rng, gender_style=0.0)
    f, m = replace(f, expressivity=1.0), replace(m, expressivity=1.0)
    for e in EMOTIONS:  # no style: both genders express an emotion identically
        assert utterance_prosody(f, e) == utterance_prosody(m, e)
    strong, weak = replace(f, gender_style=2.0), replace(f, gender_style=1.0)
    shared = utterance_prosody(m, "happy").f0_semitones
    assert utterance_prosody(strong, "happy").f0_semitones - shared == pytest.approx(
        2 * (utterance_prosody(weak, "happy").f0_semitones - shared))
    with pytest.raises(ValueError, match="gender_style"):
        sample_speaker("F2", "F", rng, gender_style=-1.0)
