"""Loaders for the supported corpora in their published layouts, into one manifest.

A manifest is a :class:`pandas.DataFrame` with one row per usable utterance and the columns
``utt_id, path, corpus, speaker, gender, emotion, session``. Only the four emotions of the paper
are kept (IEMOCAP ``exc`` counts as happy); IEMOCAP keeps improvised dialogs and MSP-Improv its
improvised conditions. Anything wrong with an entry (unknown emotion code, missing audio, a
speaker without gender, an unreadable label file) is recorded as a :class:`LoadIssue` naming the
file and the rest still loads; a missing corpus-level label file is a :class:`CorpusError`.

Corpora: IEMOCAP, CREMA-D and MSP-Improv (the paper's), EmoDB and RAVDESS (the most used free
corpora), and ``manifest``: any recordings listed in a CSV (``path, speaker, gender, emotion``).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas loads only where a corpus is read (not in every ClientApp process)
    import pandas as pd

EMOTIONS = ("neutral", "happy", "sad", "angry")
COLUMNS = ["utt_id", "path", "corpus", "speaker", "gender", "emotion", "session"]


class CorpusError(RuntimeError):
    """The corpus cannot be loaded at all (e.g. its label file is missing)."""


@dataclass(frozen=True)
class LoadIssue:
    """One entry that was skipped, with the file it came from and why."""

    path: str
    reason: str


def _frame(rows: list[dict]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values("utt_id", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- CREMA-D
_CREMA_EMOTIONS = {"NEU": "neutral", "HAP": "happy", "SAD": "sad", "ANG": "angry"}
_CREMA_OTHER = {"FEA", "DIS"}
_CREMA_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z0-9]{2})$")


def load_crema_d(root: str | Path) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """CREMA-D: ``AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav`` + ``VideoDemographics.csv``.

    One speaker per actor; gender from the demographics table's ``Sex`` column.
    """
    root = Path(root)
    demo_path = root / "VideoDemographics.csv"
    if not demo_path.exists():
        raise CorpusError(f"CREMA-D: missing demographics file {demo_path}")
    wav_dir = root / "AudioWAV"
    if not wav_dir.is_dir():
        raise CorpusError(f"CREMA-D: missing audio folder {wav_dir}")
    genders: dict[str, str] = {}
    with open(demo_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"ActorID", "Sex"} <= set(reader.fieldnames):
            raise CorpusError(f"CREMA-D: {demo_path} lacks the ActorID/Sex columns")
        for row in reader:
            sex = (row.get("Sex") or "").strip().lower()
            if sex in ("male", "female"):
                genders[row["ActorID"].strip()] = "M" if sex == "male" else "F"
    rows, issues = [], []
    for wav in sorted(wav_dir.glob("*.wav")):
        m = _CREMA_NAME.match(wav.stem)
        if not m:
            issues.append(LoadIssue(str(wav), "file name does not follow <actor>_<sentence>_<emotion>_<level>"))
            continue
        actor, _, code, _ = m.groups()
        if code in _CREMA_OTHER:
            continue  # a real emotion, just not one of the four studied
        if code not in _CREMA_EMOTIONS:
            issues.append(LoadIssue(str(wav), f"unknown emotion code {code!r}"))
            continue
        if actor not in genders:
            issues.append(LoadIssue(str(wav), f"speaker {actor} has no Sex in {demo_path.name}"))
            continue
        rows.append(dict(utt_id=wav.stem, path=str(wav), corpus="crema_d", speaker=actor,
                         gender=genders[actor], emotion=_CREMA_EMOTIONS[code], session=""))
    return _frame(rows), issues


# --------------------------------------------------------------------------- IEMOCAP
_IEMOCAP_EMOTIONS = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
_IEMOCAP_OTHER = {"fru", "sur", "fea", "dis", "oth", "xxx"}
_IEMOCAP_LINE = re.compile(r"^\[(\d+\.\d+) - (\d+\.\d+)\]\t(\S+)\t(\S+)\t\[.*\]$")


def load_iemocap(root: str | Path) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """IEMOCAP: ``Session*/dialog/EmoEvaluation/*.txt`` labels, ``Session*/sentences/wav`` audio.

    Improvised dialogs only. The speaker is the session plus the gender letter of the turn
    (``Ses01F_impro01_M003`` is spoken by ``Ses01M``); the dialog name's letter only says who
    wore the motion-capture markers.
    """
    root = Path(root)
    sessions = sorted(p for p in root.glob("Session[1-5]") if p.is_dir())
    if not sessions:
        raise CorpusError(f"IEMOCAP: no Session1..Session5 folders under {root}")
    rows, issues = [], []
    for session in sessions:
        label_dir = session / "dialog" / "EmoEvaluation"
        if not label_dir.is_dir():
            issues.append(LoadIssue(str(label_dir), "missing label folder; session skipped"))
            continue
        for label_file in sorted(label_dir.glob("*.txt")):
            if "_impro" not in label_file.stem:
                continue
            try:
                text = label_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                issues.append(LoadIssue(str(label_file), f"unreadable label file: {exc}"))
                continue
            for line in text.splitlines():
                if not line.startswith("["):
                    continue
                m = _IEMOCAP_LINE.match(line)
                if not m:
                    issues.append(LoadIssue(str(label_file), f"malformed label line {line!r}"))
                    continue
                utt, code = m.group(3), m.group(4)
                if code in _IEMOCAP_OTHER:
                    continue
                if code not in _IEMOCAP_EMOTIONS:
                    issues.append(LoadIssue(str(label_file), f"{utt}: unknown emotion code {code!r}"))
                    continue
                turn = utt.rsplit("_", 1)[-1]
                gender = turn[:1]
                if gender not in ("F", "M"):
                    issues.append(LoadIssue(str(label_file), f"{utt}: no speaker gender in turn name {turn!r}"))
                    continue
                dialog = utt.rsplit("_", 1)[0]
                wav = session / "sentences" / "wav" / dialog / f"{utt}.wav"
                if not wav.exists():
                    issues.append(LoadIssue(str(wav), f"audio for labelled turn {utt} is missing"))
                    continue
                rows.append(dict(utt_id=utt, path=str(wav), corpus="iemocap", speaker=utt[:5] + gender,
                                 gender=gender, emotion=_IEMOCAP_EMOTIONS[code], session=session.name))
    return _frame(rows), issues


# --------------------------------------------------------------------------- MSP-Improv
_MSP_EMOTIONS = {"N": "neutral", "H": "happy", "S": "sad", "A": "angry"}
_MSP_OTHER = {"O", "X"}
_MSP_LINE = re.compile(r"^UTD-IMPROV-([A-Z0-9-]+)\.avi;\s*([A-Z]);")
_MSP_NAME = re.compile(r"^MSP-IMPROV-(S\d{2}[A-Z])-([FM]\d{2})-([A-Z])-([A-Z]{2}\d{2})$")
#: Recording conditions kept by default, as in the paper's published code: T (target sentence
#: in an improvised scenario) and S; R (read) and P are dropped.
MSP_IMPROVISED = ("T", "S")


def load_msp_improv(root: str | Path, conditions: tuple[str, ...] = MSP_IMPROVISED) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """MSP-Improv: ``Evaluation.txt`` labels, ``session<k>/<scenario>/<condition>/*.wav`` audio.

    The speaker (``F01``..``M06``) and condition come from the file name; gender is the
    speaker's first letter.
    """
    root = Path(root)
    eval_path = root / "Evaluation.txt"
    if not eval_path.exists():
        raise CorpusError(f"MSP-Improv: missing label file {eval_path}")
    wavs = {p.stem: p for p in root.glob("session*/*/*/*.wav")}
    rows, issues = [], []
    for lineno, line in enumerate(eval_path.read_text().splitlines(), start=1):
        if not line.startswith("UTD-"):
            continue
        m = _MSP_LINE.match(line)
        if not m:
            issues.append(LoadIssue(f"{eval_path}:{lineno}", f"malformed label line {line[:60]!r}"))
            continue
        name, code = "MSP-IMPROV-" + m.group(1), m.group(2)
        parts = _MSP_NAME.match(name)
        if not parts:
            issues.append(LoadIssue(f"{eval_path}:{lineno}", f"utterance name {name!r} does not follow the corpus coding"))
            continue
        _, speaker, condition, _ = parts.groups()
        if condition not in conditions or code in _MSP_OTHER:
            continue
        if code not in _MSP_EMOTIONS:
            issues.append(LoadIssue(f"{eval_path}:{lineno}", f"{name}: unknown emotion code {code!r}"))
            continue
        wav = wavs.get(name)
        if wav is None:
            issues.append(LoadIssue(f"{eval_path}:{lineno}", f"audio for {name} is missing"))
            continue
        rows.append(dict(utt_id=name, path=str(wav), corpus="msp_improv", speaker=speaker,
                         gender=speaker[0], emotion=_MSP_EMOTIONS[code], session=f"session{int(speaker[1:])}:{condition}"))
    return _frame(rows), issues


# --------------------------------------------------------------------------- EmoDB
#: Speaker genders from the corpus documentation (Burkhardt et al. 2005).
EMODB_GENDERS = {"03": "M", "08": "F", "09": "F", "10": "M", "11": "M", "12": "M", "13": "F", "14": "F",
                 "15": "M", "16": "F"}
_EMODB_EMOTIONS = {"N": "neutral", "F": "happy", "T": "sad", "W": "angry"}
_EMODB_OTHER = {"L", "E", "A"}  # boredom, disgust, fear
_EMODB_NAME = re.compile(r"^(\d{2})([ab]\d{2})([A-Z])([a-z])$")


def load_emodb(root: str | Path) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """EmoDB: ``SSTTTEV.wav`` (speaker, text, emotion letter, version), flat or under ``wav/``.

    Emotion letters are German: W anger, F happiness, T sadness, N neutral (kept); L boredom,
    E disgust, A fear (dropped). Genders come from the documentation (:data:`EMODB_GENDERS`).
    """
    root = Path(root)
    folder = root / "wav" if (root / "wav").is_dir() else root
    wavs = sorted(folder.glob("*.wav"))
    if not wavs:
        raise CorpusError(f"EmoDB: no .wav files in {folder} (expected SSTTTEV.wav names, flat or under wav/)")
    rows, issues = [], []
    for wav in wavs:
        m = _EMODB_NAME.match(wav.stem)
        if not m:
            issues.append(LoadIssue(str(wav), "file name does not follow EmoDB's SSTTTEV coding"))
            continue
        speaker, text, code, _ = m.groups()
        if code in _EMODB_OTHER:
            continue
        if code not in _EMODB_EMOTIONS:
            issues.append(LoadIssue(str(wav), f"unknown emotion letter {code!r}"))
            continue
        if speaker not in EMODB_GENDERS:
            issues.append(LoadIssue(str(wav), f"speaker {speaker} is not one of EmoDB's ten speakers (no gender)"))
            continue
        rows.append(dict(utt_id=wav.stem, path=str(wav), corpus="emodb", speaker=speaker,
                         gender=EMODB_GENDERS[speaker], emotion=_EMODB_EMOTIONS[code], session=text))
    return _frame(rows), issues


# --------------------------------------------------------------------------- RAVDESS
_RAVDESS_EMOTIONS = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry"}
_RAVDESS_OTHER = {"02", "06", "07", "08"}  # calm, fearful, disgust, surprised
_RAVDESS_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")


def load_ravdess(root: str | Path) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """RAVDESS: ``Actor_NN/MM-VV-EE-II-SS-RR-NN.wav`` (modality, vocal channel, emotion, intensity,
    statement, repetition, actor).

    Audio-only (modality 03) speech (vocal channel 01) is kept; emotions 01 neutral, 03 happy,
    04 sad, 05 angry. Gender from the actor number: odd male, even female. The files are 48 kHz
    and some are stereo: :func:`fed_ser.data.audio.read_audio` makes them mono.
    """
    root = Path(root)
    actors = sorted(p for p in root.glob("Actor_*") if p.is_dir())
    if not actors:
        raise CorpusError(f"RAVDESS: no Actor_NN folders under {root}")
    rows, issues = [], []
    for folder in actors:
        for wav in sorted(folder.glob("*.wav")):
            m = _RAVDESS_NAME.match(wav.stem)
            if not m:
                issues.append(LoadIssue(str(wav), "file name does not follow RAVDESS's MM-VV-EE-II-SS-RR-NN coding"))
                continue
            modality, channel, code, _, statement, repetition, actor = m.groups()
            if modality != "03" or channel != "01":
                continue  # video, or song: not audio-only speech
            if f"Actor_{actor}" != folder.name:
                issues.append(LoadIssue(str(wav), f"actor {actor} in the name but the file is in {folder.name}"))
                continue
            if code in _RAVDESS_OTHER:
                continue
            if code not in _RAVDESS_EMOTIONS:
                issues.append(LoadIssue(str(wav), f"unknown emotion code {code!r}"))
                continue
            rows.append(dict(utt_id=wav.stem, path=str(wav), corpus="ravdess", speaker=folder.name,
                             gender="M" if int(actor) % 2 else "F", emotion=_RAVDESS_EMOTIONS[code],
                             session=f"{statement}-{repetition}"))
    return _frame(rows), issues


# --------------------------------------------------------------------------- manifest CSV
MANIFEST_COLUMNS = ("path", "speaker", "gender", "emotion")
_GENDERS = {"f": "F", "female": "F", "m": "M", "male": "M"}


def manifest_file(root: str | Path) -> Path:
    """The CSV a ``manifest`` corpus root names: the file itself, or ``manifest.csv`` in a folder."""
    root = Path(root)
    return root / "manifest.csv" if root.is_dir() else root


def load_manifest(root: str | Path, emotion_map: dict[str, str | None] | None = None,
                  allow_outside: bool = False) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """Recordings listed in a CSV with ``path, speaker, gender, emotion`` (optional ``session``).

    Paths are relative to the CSV's folder (absolute paths are kept) and resolved (``..`` and links
    followed): one that lands outside the CSV's folder stops the load naming its line, unless
    ``allow_outside`` (``data.manifest.allow_outside=true``); a file listed twice, under any two
    spellings, is reported and kept once. ``gender`` is F/M (or
    female/male); ``emotion`` is one of neutral/happy/sad/angry, or a label that
    ``emotion_map`` maps to one of them (a label mapped to ``None`` is dropped silently). A
    speaker listed with two genders is skipped as a whole.
    """
    path = manifest_file(root)
    if not path.is_file():
        raise CorpusError(f"manifest: no CSV at {path}")
    mapping = {str(k).strip().lower(): v for k, v in (emotion_map or {}).items()}
    bad_targets = sorted({v for v in mapping.values() if v is not None and v not in EMOTIONS})
    if bad_targets:
        raise CorpusError(f"data.manifest.emotion_map: maps to {bad_targets}, which are not among {list(EMOTIONS)}")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CorpusError(f"manifest: cannot read {path} ({exc})") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise CorpusError(f"manifest: {path} lacks the column(s) {missing} (it has {header})")
    rows, issues, seen, folder = [], [], set(), path.parent.resolve()
    for lineno, raw in enumerate(records, start=2):
        rec = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{path}:{lineno}"
        empty = [c for c in MANIFEST_COLUMNS if not rec.get(c)]
        if empty:
            issues.append(LoadIssue(where, f"missing {', '.join(empty)}"))
            continue
        gender = _GENDERS.get(rec["gender"].lower())
        if gender is None:
            issues.append(LoadIssue(where, f"gender {rec['gender']!r} is not F/M (or female/male)"))
            continue
        label = rec["emotion"].lower()
        if label in mapping:
            emotion = mapping[label]
            if emotion is None:
                continue
        elif label in EMOTIONS:
            emotion = label
        else:
            issues.append(LoadIssue(where, f"emotion {rec['emotion']!r} is not one of {list(EMOTIONS)}; map it in "
                                           "data.manifest.emotion_map (to null to drop it)"))
            continue
        wav = (path.parent / rec["path"]).resolve()  # an absolute path stays itself
        if not (allow_outside or wav.is_relative_to(folder)):
            raise CorpusError(f"manifest: {where}: {rec['path']!r} resolves to {wav}, outside the manifest's folder {folder}; "
                              "set data.manifest.allow_outside=true to read recordings from elsewhere")
        if not wav.is_file():
            issues.append(LoadIssue(str(wav), f"audio listed at {where} is missing"))
            continue
        if str(wav) in seen:
            issues.append(LoadIssue(str(wav), f"listed twice (again at {where}, as {rec['path']!r})"))
            continue
        seen.add(str(wav))
        rows.append(dict(utt_id=str(wav.relative_to(folder)) if wav.is_relative_to(folder) else str(wav),
                         path=str(wav), corpus="manifest", speaker=rec["speaker"], gender=gender, emotion=emotion,
                         session=rec.get("session", "")))
    genders: dict[str, set[str]] = {}
    for r in rows:
        genders.setdefault(r["speaker"], set()).add(r["gender"])
    mixed = {s for s, g in genders.items() if len(g) > 1}
    for s in sorted(mixed):
        issues.append(LoadIssue(str(path), f"speaker {s!r} is listed as both F and M; all of their rows skipped"))
    return _frame([r for r in rows if r["speaker"] not in mixed]), issues


LOADERS = {"crema_d": load_crema_d, "iemocap": load_iemocap, "msp_improv": load_msp_improv, "emodb": load_emodb,
           "ravdess": load_ravdess, "manifest": load_manifest}


def load_corpus(corpus: str, root: str | Path, **options) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """Load ``corpus`` (one of :data:`LOADERS`) from ``root``; ``options`` go to its loader
    (``emotion_map`` for ``manifest``)."""
    if corpus not in LOADERS:
        raise KeyError(f"dataset.name: unknown corpus {corpus!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[corpus](root, **options)
