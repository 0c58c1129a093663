"""Clients and speaker-independent folds.

* CREMA-D: one client per speaker. IEMOCAP and MSP-Improv: each speaker's utterances are cut
  into ``shards_per_speaker`` equal random shards, one client each (the paper's code used 10).
* Five folds over speakers; each fold holds out 20% of the speakers as test, balanced by gender.
* Inside each client, 20% of its utterances validate and 80% train.
* ``shadow.mode=speakers``: the training speakers of a fold are split, balanced by gender, between
  the private federation and the attacker (:func:`attacker_speakers`).
"""

from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    """A client would be empty or a fold cannot be formed; the message names the key."""


#: The fewest utterances a client may hold: with 20% validating, 3 rows leave 2 to train on and 1 to validate.
MIN_CLIENT_ROWS = 3


def shards_for(utterances: int, shards_per_speaker: int, min_rows: int = MIN_CLIENT_ROWS) -> int:
    """How many clients a speaker of ``utterances`` is cut into: ``shards_per_speaker``, or as many as give
    each ``min_rows`` utterances (at least one); 0 when even one client cannot have them."""
    return 0 if utterances < min_rows else max(1, min(shards_per_speaker, utterances // min_rows))


def too_small_speakers(counts: dict[str, int], shards_per_speaker: int, min_rows: int = MIN_CLIENT_ROWS) -> dict[str, int]:
    """The speakers (name -> utterances) too small for even one client of ``min_rows`` utterances (a training
    and a validation row): real corpora recorded in the wild hold such speakers, and a client without a
    training or a validation row breaks the federation. Speakers too small for ``shards_per_speaker``
    clients but not for one are cut into fewer (:func:`shards_for`)."""
    return {s: n for s, n in counts.items() if shards_for(n, shards_per_speaker, min_rows) == 0}


def speaker_folds(speakers: list[str], genders: list[str], n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Assign each speaker a test fold 0..n_folds-1, dealing each gender round-robin.

    Every fold then holds ~20% of the speakers with the corpus' gender ratio (IEMOCAP: one
    female and one male speaker per fold).
    """
    if len(speakers) != len(genders):
        raise PartitionError("speakers and genders differ in length")
    rng = np.random.default_rng([seed, 17])
    fold: dict[str, int] = {}
    offset = 0
    for g in sorted(set(genders)):
        group = sorted(s for s, gg in zip(speakers, genders) if gg == g)
        rng.shuffle(group)
        for i, s in enumerate(group):
            fold[s] = (i + offset) % n_folds
        offset += len(group)
    if len(set(fold.values())) < n_folds:
        raise PartitionError(f"{len(speakers)} speakers cannot fill {n_folds} folds")
    return fold


def attacker_speakers(speakers: list[str], genders: list[str], share: float, seed: int = 0) -> set[str]:
    """The seeded, gender-balanced ``share`` of ``speakers`` the attacker holds (``shadow.speaker_share``).

    Both sides keep at least one speaker of each gender, so neither the private clients nor the
    attacker's shadow clients are single-gender (the attack could not be trained or scored).
    """
    if not 0.0 < share < 1.0:
        raise PartitionError(f"shadow.speaker_share: must be in (0, 1), got {share}")
    rng = np.random.default_rng([seed, 37])
    held: set[str] = set()
    for g in sorted(set(genders)):
        group = sorted(s for s, gg in zip(speakers, genders) if gg == g)
        if len(group) < 2:
            raise PartitionError(f"shadow.mode=speakers: only {len(group)} training speaker(s) of gender {g}; "
                                 "the private clients and the attacker need one each")
        rng.shuffle(group)
        k = min(max(int(round(len(group) * share)), 1), len(group) - 1)
        held.update(group[:k])
    return held


def shard_speakers(speakers: np.ndarray, shards_per_speaker: int, seed: int = 0) -> np.ndarray:
    """Client index per row: each speaker's rows split into equal random shards.

    ``shards_per_speaker=1`` gives one client per speaker (CREMA-D). A speaker with fewer than
    :data:`MIN_CLIENT_ROWS` utterances a shard is cut into fewer shards (:func:`shards_for`). Clients
    are numbered in sorted speaker order. Raises :class:`PartitionError` naming the speaker if it
    cannot make even one client.
    """
    if shards_per_speaker < 1:
        raise PartitionError(f"dataset.shards_per_speaker must be >= 1, got {shards_per_speaker}")
    rng = np.random.default_rng([seed, 23])
    client = np.full(len(speakers), -1, dtype=np.int64)
    next_id = 0
    for s in sorted(np.unique(speakers).tolist()):
        rows = np.flatnonzero(speakers == s)
        k = shards_for(len(rows), shards_per_speaker)
        if k == 0:
            raise PartitionError(
                f"speaker {s!r} has {len(rows)} utterances, fewer than the {MIN_CLIENT_ROWS} a client needs for a "
                "training and a validation row"
            )
        rng.shuffle(rows)
        for shard in np.array_split(rows, k):
            client[shard] = next_id
            next_id += 1
    return client


def validation_mask(client: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """True for the rows each client keeps for validation (``val_fraction`` of its rows)."""
    rng = np.random.default_rng([seed, 29])
    mask = np.zeros(len(client), dtype=bool)
    for c in np.unique(client[client >= 0]):
        rows = np.flatnonzero(client == c)
        rng.shuffle(rows)
        n_val = int(round(len(rows) * val_fraction))
        if len(rows) - n_val < 1 or (val_fraction > 0 and n_val < 1):
            raise PartitionError(f"client {c} has {len(rows)} utterances: it needs {MIN_CLIENT_ROWS} for a training and "
                                 "a validation row")
        mask[rows[:n_val]] = True
    return mask
