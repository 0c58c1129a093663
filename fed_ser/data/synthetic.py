"""Synthetic speech corpora written in the published on-disk layouts of the real ones.

``generate(root, corpus, scale, seed)`` writes real 16 kHz mono WAV files plus metadata exactly
where and how the real corpus keeps them, so the *real* loaders in :mod:`fed_ser.data.corpora`
read them unchanged:

* CREMA-D: ``AudioWAV/<actor>_<sentence>_<EMO>_<level>.wav`` and ``VideoDemographics.csv``.
* IEMOCAP: ``Session<k>/sentences/wav/<dialog>/<utt>.wav`` and
  ``Session<k>/dialog/EmoEvaluation/<dialog>.txt`` (improvised and scripted dialogs).
* MSP-Improv: ``session<k>/<scenario>/<condition>/MSP-IMPROV-<...>.wav`` and ``Evaluation.txt``.
* EmoDB: ``wav/SSTTTEV.wav`` (speaker, text, German emotion letter, version), 16 kHz.
* RAVDESS: ``Actor_NN/03-01-EE-II-SS-RR-NN.wav`` at 48 kHz, stereo (and some song files, ``03-02``).

Speaker counts and gender splits match the real corpora; emotion proportions follow the counts
the paper used; ``scale`` shrinks utterances per speaker (tests use ~0.05). A few utterances with
labels the loaders must drop (other emotions, scripted/read conditions) are written too.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from fed_ser.data.audio import resample
from fed_ser.data.corpora import EMODB_GENDERS
from fed_ser.data.voice import DEFAULT_GENDER_STYLE, SAMPLE_RATE, Speaker, check_voice, sample_speaker, synthesize
from fed_ser.io import atomic_write_text

CORPORA = ("crema_d", "iemocap", "msp_improv", "emodb", "ravdess")  # every layout the generator writes
PAPER_CORPORA = CORPORA[:3]  # the paper's three, the attacker's default shadow corpora

# Utterances per emotion in the paper's Table I (neutral, happy, sad, angry), per corpus.
_TABLE_I = {
    "crema_d": (1972, 1219, 588, 1019),
    "iemocap": (1099, 947, 608, 289),
    "msp_improv": (2072, 1184, 739, 585),
    "emodb": (79, 71, 62, 127),  # the corpus' own counts
    "ravdess": (96, 192, 192, 192),  # per actor: neutral 2 statements x 2 repetitions, others x 2 intensities
}
_SPEAKERS = {"crema_d": (48, 43), "iemocap": (5, 5), "msp_improv": (6, 6), "emodb": (5, 5), "ravdess": (12, 12)}  # (male, female)
_EXTRA_SHARE = 0.08  # utterances with labels the loaders must drop


@dataclass(frozen=True)
class _Job:
    corpus: str
    speaker: Speaker
    index: int
    counts: tuple[int, int, int, int]
    n_extra: int
    root: str
    seed: int


def _speaker_list(corpus: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    n_male, n_female = _SPEAKERS[corpus]
    if corpus == "crema_d":
        genders = np.array(["M"] * n_male + ["F"] * n_female)
        rng.shuffle(genders)
        return [(str(1001 + i), str(g)) for i, g in enumerate(genders)]
    if corpus == "iemocap":
        return [(f"Ses0{s}{g}", g) for s in range(1, 6) for g in ("F", "M")]
    if corpus == "emodb":
        return sorted(EMODB_GENDERS.items())
    if corpus == "ravdess":
        return [(f"{a:02d}", "M" if a % 2 else "F") for a in range(1, 25)]
    return [(f"{g}0{s}", g) for s in range(1, 7) for g in ("F", "M")]


def _per_speaker_counts(corpus: str, n_speakers: int, scale: float) -> tuple[int, int, int, int]:
    counts = [max(1, int(round(c / n_speakers * scale))) for c in _TABLE_I[corpus]]
    return tuple(counts)  # type: ignore[return-value]


def _write_wav(path: Path, wave: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    sf.write(tmp, wave, rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def _emotion_plan(job: _Job, rng: np.random.Generator) -> list[str]:
    plan = [e for e, c in zip(("neutral", "happy", "sad", "angry"), job.counts) for _ in range(c)]
    plan += ["other"] * job.n_extra
    rng.shuffle(plan)
    return plan


def _render(job: _Job, rng: np.random.Generator, emotion: str) -> tuple[np.ndarray, float]:
    intensity = float(rng.choice([0.7, 1.0, 1.3])) if job.corpus == "crema_d" else 1.0
    voiced = "neutral" if emotion == "other" else emotion
    return synthesize(job.speaker, voiced, rng, intensity=intensity), intensity


# --------------------------------------------------------------------------- CREMA-D
_CREMA_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
_CREMA_CODES = {"neutral": "NEU", "happy": "HAP", "sad": "SAD", "angry": "ANG"}
_CREMA_LEVEL = {0.7: "LO", 1.0: "MD", 1.3: "HI"}


def _crema_speaker(job: _Job) -> list[str]:
    rng = np.random.default_rng([job.seed, 1, job.index])
    root = Path(job.root)
    used: set[str] = set()
    for emotion in _emotion_plan(job, rng):
        wave, intensity = _render(job, rng, emotion)
        code = _CREMA_CODES.get(emotion) or str(rng.choice(["FEA", "DIS"]))
        level = _CREMA_LEVEL[intensity] if code != "NEU" else "XX"
        for k in range(1000):  # the real corpus has one file per sentence/emotion/level
            sent = _CREMA_SENTENCES[k % len(_CREMA_SENTENCES)]
            lvl = level if k < len(_CREMA_SENTENCES) else f"X{k // len(_CREMA_SENTENCES)}"
            name = f"{job.speaker.speaker_id}_{sent}_{code}_{lvl}"
            if name not in used:
                break
        used.add(name)
        _write_wav(root / "AudioWAV" / f"{name}.wav", wave)
    return []


def _crema_metadata(root: Path, speakers: list[Speaker], rng: np.random.Generator) -> None:
    lines = ["ActorID,Age,Sex,Race,Ethnicity"]
    for s in speakers:
        sex = "Female" if s.gender == "F" else "Male"
        race = rng.choice(["Caucasian", "African American", "Asian", "Unknown"])
        eth = rng.choice(["Not Hispanic", "Hispanic"])
        lines.append(f"{s.speaker_id},{int(rng.integers(20, 75))},{sex},{race},{eth}")
    atomic_write_text(root / "VideoDemographics.csv", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- IEMOCAP
_IEMOCAP_CODES = {"neutral": "neu", "happy": "hap", "sad": "sad", "angry": "ang"}
_IEMOCAP_DIALOGS = 8  # impro01..impro08 per session, each recorded with both markers (F/M)


def _iemocap_speaker(job: _Job) -> list[str]:
    """Write this speaker's turns; return label lines as 'dialog\\tstart\\tutt\\tcode'."""
    rng = np.random.default_rng([job.seed, 2, job.index])
    root = Path(job.root)
    sid = job.speaker.speaker_id  # e.g. Ses01F
    session, gender = sid[:5], sid[5]
    labels: list[str] = []
    counters: dict[str, int] = {}
    clock: dict[str, float] = {}
    plan = _emotion_plan(job, rng)
    n_script = max(1, len(plan) // 20)
    plan += ["script"] * n_script
    for emotion in plan:
        if emotion == "script":
            dialog = f"{session}{rng.choice(['F', 'M'])}_script0{int(rng.integers(1, 4))}_1"
            code = str(rng.choice(list(_IEMOCAP_CODES.values())))
            voiced = "neutral"
        else:
            dialog = f"{session}{rng.choice(['F', 'M'])}_impro0{int(rng.integers(1, _IEMOCAP_DIALOGS + 1))}"
            voiced = emotion
            if emotion == "other":
                code = str(rng.choice(["fru", "sur", "xxx", "oth"]))
            elif emotion == "happy":
                code = str(rng.choice(["hap", "exc"]))  # the loader merges exc into happy
            else:
                code = _IEMOCAP_CODES[emotion]
        n = counters.get(dialog, 0)
        counters[dialog] = n + 1
        utt = f"{dialog}_{gender}{n:03d}"
        wave, _ = _render(job, rng, voiced if voiced != "script" else "neutral")
        start = clock.get(dialog, float(rng.uniform(1.0, 5.0)))
        clock[dialog] = start + wave.size / SAMPLE_RATE + float(rng.uniform(0.3, 2.0))
        _write_wav(root / f"Session{int(session[3:])}" / "sentences" / "wav" / dialog / f"{utt}.wav", wave)
        labels.append(f"{dialog}\t{start:.4f}\t{start + wave.size / SAMPLE_RATE:.4f}\t{utt}\t{code}")
    return labels


_IEMOCAP_WORDS = {
    "neu": "Neutral state", "hap": "Happiness", "exc": "Excited", "sad": "Sadness", "ang": "Anger",
    "fru": "Frustration", "sur": "Surprise", "xxx": "Other", "oth": "Other",
}


def _iemocap_metadata(root: Path, label_lines: list[str], rng: np.random.Generator) -> None:
    by_dialog: dict[str, list[tuple[float, str]]] = {}
    for line in label_lines:
        dialog, start, end, utt, code = line.split("\t")
        v, a, d = (rng.integers(1, 5, 3) + rng.choice([0.0, 0.5], 3)).tolist()
        block = (
            f"[{start} - {end}]\t{utt}\t{code}\t[{v:.4f}, {a:.4f}, {d:.4f}]\n"
            f"C-E1:\t{_IEMOCAP_WORDS[code]}; ()\n"
            f"C-E2:\t{_IEMOCAP_WORDS[code]}; ()\n"
            f"C-F1:\t{_IEMOCAP_WORDS[code]}; ()\n"
            f"A-E1:\tval {int(v)}; act {int(a)}; dom  {int(d)};\t()\n"
            f"A-F1:\tval {int(v)}; act {int(a)}; dom  {int(d)};\t()\n"
        )
        by_dialog.setdefault(dialog, []).append((float(start), block))
    for dialog, blocks in by_dialog.items():
        blocks.sort()
        text = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n" + "\n".join(b for _, b in blocks)
        session = f"Session{int(dialog[3:5])}"
        atomic_write_text(root / session / "dialog" / "EmoEvaluation" / f"{dialog}.txt", text + "\n")


# --------------------------------------------------------------------------- MSP-Improv
_MSP_CODES = {"neutral": "N", "happy": "H", "sad": "S", "angry": "A"}
_MSP_SCENARIO = {"neutral": "N", "happy": "H", "sad": "S", "angry": "A"}
_MSP_WORDS = {"A": "Angry", "H": "Happy", "S": "Sad", "N": "Neutral", "O": "Other", "X": "Other"}


def _msp_speaker(job: _Job) -> list[str]:
    """Write this speaker's utterances; return Evaluation.txt records 'name\\tcode'."""
    rng = np.random.default_rng([job.seed, 3, job.index])
    root = Path(job.root)
    spk = job.speaker.speaker_id  # F01 / M01
    session = int(spk[1:])
    pair = "FM" if spk[0] == "F" else "MF"
    records: list[str] = []
    counters: dict[str, int] = {}
    plan = _emotion_plan(job, rng)
    for emotion in plan:
        if emotion == "other":
            code = str(rng.choice(["O", "X"]))
            scenario_emotion = str(rng.choice(list(_MSP_SCENARIO)))
            condition = str(rng.choice(["T", "S"]))
        else:
            code = _MSP_CODES[emotion]
            scenario_emotion = emotion
            condition = str(rng.choice(["T", "S", "S", "S"]))
        if rng.random() < 0.06:  # read and 'other improvised' recordings, dropped by the loader
            condition = str(rng.choice(["R", "P"]))
        scenario = f"S{int(rng.integers(1, 16)):02d}{_MSP_SCENARIO[scenario_emotion]}"
        key = f"{scenario}-{spk}-{condition}"
        n = counters.get(key, 0) + 1
        counters[key] = n
        name = f"MSP-IMPROV-{scenario}-{spk}-{condition}-{pair}{n:02d}"
        wave, _ = _render(job, rng, emotion)
        _write_wav(root / f"session{session}" / scenario / condition / f"{name}.wav", wave)
        records.append(f"{name}\t{code}")
    return records


def _msp_metadata(root: Path, records: list[str], rng: np.random.Generator) -> None:
    out = []
    for rec in sorted(records):
        name, code = rec.split("\t")
        a, v, d, nat = rng.uniform(1, 5, 4)
        out.append(
            f"UTD-{name[4:]}.avi; {code}; A:{a:.6f}; V:{v:.6f}; D:{d:.6f} ; N:{nat:.6f};\n"
            f"rater{int(rng.integers(1, 50)):02d}; {_MSP_WORDS[code]}; ; A:{a:.6f}; V:{v:.6f}; D:{d:.6f} ; N:{nat:.6f};\n"
        )
    atomic_write_text(root / "Evaluation.txt", "\n".join(out))


# --------------------------------------------------------------------------- EmoDB
_EMODB_TEXTS = ("a01", "a02", "a04", "a05", "a07", "b01", "b02", "b03", "b09", "b10")
_EMODB_LETTERS = {"neutral": "N", "happy": "F", "sad": "T", "angry": "W"}


def _emodb_speaker(job: _Job) -> list[str]:
    rng = np.random.default_rng([job.seed, 4, job.index])
    used: dict[tuple[str, str], int] = {}
    for emotion in _emotion_plan(job, rng):
        letter = _EMODB_LETTERS.get(emotion) or str(rng.choice(["L", "E", "A"]))  # boredom, disgust, fear
        text = str(rng.choice(_EMODB_TEXTS))
        version = used.get((text, letter), 0)
        used[(text, letter)] = version + 1
        wave, _ = _render(job, rng, emotion)
        _write_wav(Path(job.root) / "wav" / f"{job.speaker.speaker_id}{text}{letter}{'abcdefghijklmnopqrstuvwxyz'[version % 26]}"
                   f"{'' if version < 26 else version // 26}.wav", wave)
    return []


# --------------------------------------------------------------------------- RAVDESS
_RAVDESS_CODES = {"neutral": "01", "happy": "03", "sad": "04", "angry": "05"}
RAVDESS_RATE = 48_000


def _ravdess_speaker(job: _Job) -> list[str]:
    """Audio-only speech (03-01) at 48 kHz stereo, as the corpus ships it; a few song files (03-02)."""
    rng = np.random.default_rng([job.seed, 5, job.index])
    actor = job.speaker.speaker_id
    taken: dict[tuple[str, str], int] = {}
    plan = _emotion_plan(job, rng)
    plan += ["song"] * max(1, len(plan) // 12)
    for emotion in plan:
        channel = "02" if emotion == "song" else "01"
        code = _RAVDESS_CODES.get(emotion) or str(rng.choice(["02", "06", "07", "08"]))
        # the corpus' design: intensity (none strong for neutral) x statement x repetition, in a seeded
        # order; repetitions beyond 02 only when the scale asks for more than the design holds
        k = taken.get((channel, code), 0)
        taken[(channel, code)] = k + 1
        levels = ("01",) if code == "01" else ("01", "02")
        intensity, statement = levels[k % len(levels)], f"{1 + (k // len(levels)) % 2:02d}"
        repetition = f"{1 + k // (2 * len(levels)):02d}"
        voiced = emotion if emotion in _RAVDESS_CODES else "neutral"
        wave = synthesize(job.speaker, voiced, rng, intensity=1.3 if intensity == "02" else 1.0)
        wave = resample(wave, SAMPLE_RATE, RAVDESS_RATE)
        stereo = np.stack([wave, np.roll(wave, 3) * 0.9], axis=1)  # two microphones: not identical channels
        name = f"03-{channel}-{code}-{intensity}-{statement}-{repetition}-{actor}"
        _write_wav(Path(job.root) / f"Actor_{actor}" / f"{name}.wav", stereo, RAVDESS_RATE)
    return []


_WRITERS = {"crema_d": _crema_speaker, "iemocap": _iemocap_speaker, "msp_improv": _msp_speaker, "emodb": _emodb_speaker,
            "ravdess": _ravdess_speaker}


def _run_job(job: _Job) -> list[str]:
    return _WRITERS[job.corpus](job)


def _stamp(corpus: str, scale: float, seed: int, gender_style: float, voice: str = "designed") -> str:
    """What ``.fed_ser_synthetic`` holds: every parameter the audio depends on (the designed voice
    is not named, so corpora written before there was a choice stay valid)."""
    named = "" if voice == "designed" else f"voice={voice}\n"
    return f"corpus={corpus}\nscale={scale}\nseed={seed}\ngender_style={gender_style}\n{named}"


def generate(root: str | Path, corpus: str, scale: float = 1.0, seed: int = 0, workers: int | None = None,
             gender_style: float = DEFAULT_GENDER_STYLE, voice: str = "designed") -> Path:
    """Write one synthetic corpus under ``root`` in its real layout; return ``root``.

    ``gender_style`` scales how differently the genders express emotion (the cue a client's
    update leaks, see :mod:`fed_ser.data.voice`); ``voice`` picks the voice model
    (:data:`fed_ser.data.voice.VOICES`). Deterministic for
    ``(corpus, scale, seed, gender_style, voice)``: each speaker draws from its own seeded stream,
    so the result does not depend on ``workers``. Labels/metadata are written last and
    atomically, so an interrupted run never leaves a label file pointing at missing audio.
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus: unknown {corpus!r}; expected one of {CORPORA}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    check_voice(voice)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0, CORPORA.index(corpus)])
    ids = _speaker_list(corpus, rng)
    speakers = [sample_speaker(sid, g, rng, gender_style, voice) for sid, g in ids]
    counts = _per_speaker_counts(corpus, len(speakers), scale)
    n_extra = max(1, int(round(sum(counts) * _EXTRA_SHARE)))
    jobs = [_Job(corpus, s, i, counts, n_extra, str(root), seed) for i, s in enumerate(speakers)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_run_job, jobs))
    else:
        results = [_run_job(j) for j in jobs]
    lines = [line for r in results for line in r]
    if corpus == "crema_d":
        _crema_metadata(root, speakers, rng)
    elif corpus == "iemocap":
        _iemocap_metadata(root, lines, rng)
    elif corpus == "msp_improv":
        _msp_metadata(root, lines, rng)
    atomic_write_text(root / ".fed_ser_synthetic", _stamp(corpus, scale, seed, gender_style, voice))
    return root


def ensure_corpus(root: str | Path, corpus: str, scale: float, seed: int,
                  gender_style: float = DEFAULT_GENDER_STYLE, voice: str = "designed") -> Path:
    """Generate the corpus unless the same (corpus, scale, seed, gender_style, voice) is complete at ``root``.

    Refuses to write into a non-empty folder that holds anything else (other parameters, or a
    real corpus): mixing two corpora in one tree would silently corrupt both.
    """
    root = Path(root)
    stamp = root / ".fed_ser_synthetic"
    want = _stamp(corpus, scale, seed, gender_style, voice)
    if stamp.exists() and stamp.read_text() == want:
        return root
    if root.exists() and any(root.iterdir()):
        found = stamp.read_text().replace("\n", " ").strip() if stamp.exists() else "files that are not a finished synthetic corpus"
        raise FileExistsError(
            f"{root} already holds {found}; want {want.replace(chr(10), ' ').strip()}. "
            "Use another data.root (the default folder names every parameter) or remove that folder."
        )
    return generate(root, corpus, scale=scale, seed=seed, gender_style=gender_style, voice=voice)
