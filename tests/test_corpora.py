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


# --------------------------------------------------------------------------- EmoDB, RAVDESS, manifest
def test_emodb_reads_its_coding_flat_or_under_wav_and_names_bad_files(tmp_path):
    from fed_ser.data.corpora import EMODB_GENDERS, load_emodb

    root = generate(tmp_path / "emodb", "emodb", scale=0.2, seed=1)
    wavs = sorted((root / "wav").glob("*.wav"))
    assert any(p.stem[5] in "LEA" for p in wavs)  # boredom / disgust / fear exist and are dropped silently
    shutil.copy(wavs[0], root / "wav" / "03a01Xa.wav")  # unknown emotion letter
    shutil.copy(wavs[0], root / "wav" / "99a01Wa.wav")  # not one of the ten speakers
    shutil.copy(wavs[0], root / "wav" / "take2.wav")  # not the coding at all
    df, issues = load_emodb(root)
    reasons = {i.path.split("/")[-1]: i.reason for i in issues}
    assert set(reasons) == {"03a01Xa.wav", "99a01Wa.wav", "take2.wav"}
    assert "unknown emotion letter 'X'" in reasons["03a01Xa.wav"] and "speaker 99" in reasons["99a01Wa.wav"]
    assert dict(df.groupby("speaker").gender.first()) == EMODB_GENDERS  # genders from the documentation
    assert set(df.emotion) == {"neutral", "happy", "sad", "angry"}
    assert (df.utt_id.str[5] == "W").sum() == (df.emotion == "angry").sum()  # W is anger (German: Wut)
    for p in (root / "wav").iterdir():  # the flat layout reads the same
        p.rename(root / p.name)
    (root / "wav").rmdir()
    assert len(load_emodb(root)[0]) == len(df)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .wav files"):
        load_emodb(tmp_path / "empty")


def test_ravdess_keeps_audio_only_speech_of_four_emotions_gender_from_actor_parity(tmp_path):
    from fed_ser.data.corpora import load_ravdess

    root = generate(tmp_path / "ravdess", "ravdess", scale=0.1, seed=1)
    wave, rate = sf.read(next((root / "Actor_01").glob("03-01-*.wav")))
    assert rate == 48_000 and wave.ndim == 2  # the corpus' own format: 48 kHz stereo
    assert any((root / "Actor_01").glob("03-02-*.wav"))  # song files exist on disk
    src = next((root / "Actor_01").glob("03-01-05-*.wav"))
    shutil.copy(src, root / "Actor_02" / src.name)  # actor 01 in actor 02's folder
    shutil.copy(src, root / "Actor_01" / "03-01-09-01-01-01-01.wav")  # no emotion 09
    shutil.copy(src, root / "Actor_01" / "01-01-05-01-01-01-01.wav")  # full AV modality: not audio-only
    shutil.copy(src, root / "Actor_01" / "clip.wav")
    df, issues = load_ravdess(root)
    reasons = {(i.path.split("/")[-2], i.path.split("/")[-1]): i.reason for i in issues}
    assert "in Actor_02" in reasons[("Actor_02", src.name)]
    assert "unknown emotion code '09'" in reasons[("Actor_01", "03-01-09-01-01-01-01.wav")]
    assert ("Actor_01", "clip.wav") in reasons and len(reasons) == 3
    assert df.speaker.nunique() == 24 and set(df.emotion) == {"neutral", "happy", "sad", "angry"}
    assert all(g == ("M" if int(s[-2:]) % 2 else "F") for s, g in zip(df.speaker, df.gender))
    assert df.utt_id.str.startswith("03-01-").all()  # no song, no video
    with pytest.raises(CorpusError, match="Actor_NN"):
        load_ravdess(tmp_path)


def test_manifest_reads_relative_paths_maps_labels_and_names_each_bad_row(tmp_path):
    from fed_ser.data.corpora import load_manifest

    root = generate(tmp_path / "rec", "emodb", scale=0.1, seed=2)
    wavs = sorted((root / "wav").glob("*.wav"))[:9]
    rel = [str(p.relative_to(tmp_path)) for p in wavs]
    rows = [
        "path,speaker,gender,emotion,session",
        f"{rel[0]},s1,F,neutral,a", f"{rel[1]},s1,female,joy,a",  # mapped label
        f"{rel[2]},s2,M,fear,b",  # mapped to null: dropped silently
        f"{rel[3]},s2,M,boredom,b",  # unmapped and not one of the four
        f"{rel[4]},s2,M,,b",  # missing label
        "missing/nothing.wav,s3,M,sad,c",
        f"{rel[5]},s3,X,sad,c",  # unknown gender
        f"{rel[0]},s1,F,neutral,a",  # listed twice
        f"{rel[6]},s4,F,angry,d", f"{rel[7]},s4,M,angry,d",  # a speaker listed with two genders
        f"{wavs[8]},s5,m,SAD,e",  # absolute path, case-insensitive labels
    ]
    csv_path = tmp_path / "manifest.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    df, issues = load_manifest(csv_path, {"Joy": "happy", "fear": None})
    assert list(df.emotion) == ["neutral", "happy", "sad"] and list(df.speaker) == ["s1", "s1", "s5"]
    text = "\n".join(f"{i.path} {i.reason}" for i in issues)
    assert "manifest.csv:5 emotion 'boredom' is not one of" in text and "data.manifest.emotion_map" in text
    assert "manifest.csv:6 missing emotion" in text
    assert "nothing.wav audio listed at" in text and "manifest.csv:8 gender 'X'" in text
    assert "listed twice" in text and "speaker 's4' is listed as both F and M" in text
    assert len(load_manifest(tmp_path, {"joy": "happy", "fear": None})[0]) == 3  # a folder: its manifest.csv
    csv_path.write_text("path,speaker,emotion\n")
    with pytest.raises(CorpusError, match=r"lacks the column\(s\) \['gender'\]"):
        load_manifest(csv_path)
    with pytest.raises(CorpusError, match="emotion_map"):
        load_manifest(tmp_path, {"joy": "elated"})


def test_manifest_paths_are_resolved_stay_in_its_folder_and_are_counted_once(tmp_path):
    from fed_ser.data.corpora import load_manifest

    root = generate(tmp_path / "rec" / "emodb", "emodb", scale=0.1, seed=2)
    wavs = sorted((root / "wav").glob("*.wav"))[:2]
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(wavs[1].read_bytes())
    rel = wavs[0].relative_to(tmp_path / "rec")
    (tmp_path / "rec" / "alias").symlink_to(root)
    csv_path = tmp_path / "rec" / "manifest.csv"
    twice = ["path,speaker,gender,emotion", f"{rel},s1,F,neutral", f"./emodb/../{rel},s1,F,neutral", f"alias/{rel.relative_to('emodb')},s1,F,neutral",
             f"{wavs[0]},s1,F,neutral"]  # one file under four spellings: relative, with .., through a link, absolute
    csv_path.write_text("\n".join(twice) + "\n")
    df, issues = load_manifest(csv_path)
    assert list(df.path) == [str(wavs[0].resolve())] and sum("listed twice" in i.reason for i in issues) == 3
    for escape in ("../elsewhere.wav", str(outside)):  # a parent folder's file, an absolute path elsewhere
        csv_path.write_text(f"path,speaker,gender,emotion\n{rel},s1,F,neutral\n{escape},s2,M,sad\n")
        with pytest.raises(CorpusError, match=r"manifest\.csv:3: .* outside the manifest's folder .*data\.manifest\.allow_outside=true"):
            load_manifest(csv_path)
        df, _ = load_manifest(csv_path, allow_outside=True)
        assert set(df.path) == {str(wavs[0].resolve()), str(outside.resolve())}


def test_fed_ser_synth_never_writes_over_a_folder_that_holds_anything_else(tmp_path, capsys):
    """A real corpus in OUT/<corpus> (here its demographics file) stops fed-ser-synth before it writes anything."""
    import importlib
    import tomllib
    from pathlib import Path

    ref = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]["fed-ser-synth"]
    synth = getattr(importlib.import_module(ref.partition(":")[0]), ref.partition(":")[2])
    real = tmp_path / "crema_d"
    real.mkdir()
    (real / "VideoDemographics.csv").write_text("ActorID,Age,Sex\n1001,51,Male\n")
    with pytest.raises(SystemExit) as stop:
        synth([str(tmp_path), "--corpus", "paper", "--scale", "0.02"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and f"{real} already hold(s) other files" in err[0]
    assert [p.name for p in tmp_path.rglob("*")] == ["crema_d", "VideoDemographics.csv"]  # nothing written, nothing replaced
    synth([str(tmp_path / "new"), "--corpus", "emodb", "--scale", "0.05"])
    first = sorted(p.name for p in (tmp_path / "new" / "emodb").rglob("*.wav"))
    synth([str(tmp_path / "new"), "--corpus", "emodb", "--scale", "0.05"])  # the very same corpus: kept as it is
    assert first and sorted(p.name for p in (tmp_path / "new" / "emodb").rglob("*.wav")) == first
