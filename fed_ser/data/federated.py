"""The prepared federated data set: features, labels, clients, folds, in one ``.npz``.

Everything the ClientApps and the ServerApp need is in this one file, so simulation workers,
real SuperNodes and the attack read the same thing. Client attributes (speaker, gender) are kept
for building attack ground truth only; they never travel in a Flower message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fed_ser.data.corpora import EMOTIONS
from fed_ser.data.partition import MIN_CLIENT_ROWS, attacker_speakers, shard_speakers, speaker_folds, validation_mask
from fed_ser.io import atomic_save_npz

if TYPE_CHECKING:
    import pandas as pd

TRAIN, VAL, TEST = 0, 1, 2


@dataclass
class FederatedData:
    """Rows are utterances; ``client[i] == -1`` for held-out test speakers."""

    X: np.ndarray  # (n, d) float32, per-speaker z-normalised
    y: np.ndarray  # (n,) emotion index into EMOTIONS
    client: np.ndarray  # (n,) client index or -1
    split: np.ndarray  # (n,) TRAIN / VAL / TEST
    client_speaker: np.ndarray  # (n_clients,) str
    client_gender: np.ndarray  # (n_clients,) "F"/"M"
    client_corpus: np.ndarray  # (n_clients,) str
    speaker: np.ndarray | None = None  # (n,) each row's speaker (the held-out speakers' for SER intervals); None: not kept
    X_raw: np.ndarray | None = None  # (n, d) the features before normalisation, kept under features.norm=client (the
    # attacker's virtual clients normalise themselves, as the private clients did)

    @property
    def num_clients(self) -> int:
        return len(self.client_speaker)

    def client_rows(self, client: int, split: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of client ``client`` in ``split``; raises if the shard is empty."""
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range: this data set has {self.num_clients} clients")
        rows = (self.client == client) & (self.split == split)
        if not rows.any():
            raise ValueError(f"client {client} has no {['train', 'validation', 'test'][split]} rows (empty shard)")
        return self.X[rows], self.y[rows]

    def test_rows(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.split == TEST
        return self.X[rows], self.y[rows]

    def test_speakers(self) -> np.ndarray | None:
        """The speaker of each held-out test row (None for data sets prepared without row speakers)."""
        return None if self.speaker is None else self.speaker[self.split == TEST]

    def save(self, path: str | Path) -> None:
        atomic_save_npz(path, **{k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None})

    @classmethod
    def load(cls, path: str | Path) -> FederatedData:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__ if k in z.files})


def build_federated(
    manifest: pd.DataFrame,
    Z: np.ndarray,
    fold: int,
    shards_per_speaker: dict[str, int],
    n_folds: int = 5,
    train_share: float = 1.0,
    seed: int = 0,
    speaker_role: str | None = None,
    attacker_share: float = 0.5,
) -> FederatedData:
    """Partition z-normalised features ``Z`` (rows of ``manifest``) into clients for ``fold``.

    ``manifest`` may hold several corpora (the attacker's shadow union); folds are drawn per
    corpus and source (a real corpus and its synthetic twin are two corpora here; the optional
    ``source`` column says which). ``train_share < 1`` keeps that share of each client's rows (the
    shadow models use 80% of the attacker's data). ``speaker_role`` (``shadow.mode=speakers``)
    keeps, of each corpus' training speakers, the ``private`` ones or those the ``attacker``
    holds (:func:`fed_ser.data.partition.attacker_speakers`); the fold's test speakers stay test.
    """
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    if len(manifest) != len(Z):
        raise ValueError("manifest and features differ in length")
    if speaker_role not in (None, "private", "attacker"):
        raise ValueError(f"speaker_role: {speaker_role!r} is not 'private' or 'attacker'")
    rng = np.random.default_rng([seed, 31, fold])
    keep = np.ones(len(manifest), dtype=bool)
    client = np.full(len(manifest), -1, dtype=np.int64)
    names = manifest.corpus.to_numpy()
    labels = corpus_labels(manifest)
    cs, cg, cc = [], [], []
    for label in sorted(set(labels)):
        part = labels == label
        corpus = names[part][0]
        spk = manifest.speaker.to_numpy()[part]
        gen = manifest.gender.to_numpy()[part]
        first = {s: g for s, g in zip(spk, gen)}
        folds = speaker_folds(list(first), list(first.values()), n_folds, seed)
        is_test = np.array([folds[s] == fold for s in spk])
        if speaker_role is not None:
            train_spk = [s for s in first if folds[s] != fold]
            held = attacker_speakers(train_spk, [first[s] for s in train_spk], attacker_share, seed * 7919 + fold)
            outside = np.array([(s in held) != (speaker_role == "attacker") for s in spk]) & ~is_test
            keep[np.flatnonzero(part)[outside]] = False
        else:
            outside = np.zeros(len(spk), dtype=bool)
        train_idx = np.flatnonzero(part)[~is_test & ~outside]
        local = shard_speakers(spk[~is_test & ~outside], shards_per_speaker.get(corpus, 1), seed)
        offset = len(cs)
        client[train_idx] = local + offset
        for c in range(local.max() + 1):
            s = spk[~is_test & ~outside][local == c][0]
            cs.append(s)
            cg.append(first[s])
            cc.append(label)
        if train_share < 1.0:
            for c in range(offset, len(cs)):
                rows = np.flatnonzero(client == c)
                drop = rng.permutation(rows)[max(int(round(len(rows) * train_share)), min(MIN_CLIENT_ROWS, len(rows))):]
                keep[drop] = False
    client = client[keep]
    split = np.where(client < 0, TEST, TRAIN)
    split[validation_mask(client, 0.2, seed)] = VAL
    y = manifest.emotion.map({e: i for i, e in enumerate(EMOTIONS)}).to_numpy()
    return FederatedData(
        X=np.asarray(Z, dtype=np.float32)[keep], y=y[keep].astype(np.int64), client=client,
        split=split.astype(np.int8), client_speaker=np.array(cs, dtype=str),
        client_gender=np.array(cg, dtype=str), client_corpus=np.array(cc, dtype=str),
        speaker=np.char.add(np.char.add(labels.astype(str), "/"), manifest.speaker.to_numpy().astype(str))[keep],
    )


def fold_roles(genders: dict[str, str], fold: int, n_folds: int = 5, seed: int = 0,
               attacker_share: float = 0.5) -> tuple[set[str], set[str]]:
    """Of one corpus's speakers (name -> gender): the test speakers of ``fold``, and the training speakers the
    attacker holds under ``shadow.mode=speakers`` (the split :func:`build_federated` makes)."""
    folds = speaker_folds(list(genders), list(genders.values()), n_folds, seed)
    train = [s for s in genders if folds[s] != fold]
    held = attacker_speakers(train, [genders[s] for s in train], attacker_share, seed * 7919 + fold)
    return {s for s in genders if folds[s] == fold}, held


def corpus_labels(manifest: pd.DataFrame) -> np.ndarray:
    """Per row, the corpus as reports name it: ``iemocap`` (real) or ``iemocap (synthetic)``."""
    names = manifest.corpus.to_numpy().astype(str)
    if "source" not in manifest:
        return names
    synthetic = manifest.source.to_numpy() == "synthetic"
    return np.where(synthetic, np.char.add(names, " (synthetic)"), names)
