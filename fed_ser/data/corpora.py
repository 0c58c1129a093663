"""Loaders for IEMOCAP, CREMA-D and MSP-Improv in their published layouts, into one manifest.

A manifest is a :class:`pandas.DataFrame` with one row per usable utterance and the columns
``utt_id, path, corpus, speaker, gender, emotion, session``. Only the four emotions of the paper
are kept (IEMOCAP ``exc`` counts as happy); IEMOCAP keeps improvised dialogs and MSP-Improv its
improvised conditions. Anything wrong with an entry (unknown emotion code, missing audio, a
speaker without gender, an unreadable label file) is recorded as a :class:`LoadIssue` naming the
file and the rest still loads; a missing corpus-level label file is a :class:`CorpusError`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

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


LOADERS = {"crema_d": load_crema_d, "iemocap": load_iemocap, "msp_improv": load_msp_improv}


def load_corpus(corpus: str, root: str | Path) -> tuple[pd.DataFrame, list[LoadIssue]]:
    """Load ``corpus`` (one of :data:`LOADERS`) from ``root``."""
    if corpus not in LOADERS:
        raise KeyError(f"dataset.name: unknown corpus {corpus!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[corpus](root)
