"""Append-only on-disk store of recorded client updates (no Flower import: attacks read it).

Layout of a store directory::

    updates.bin    framed records: MAGIC | header length | payload length | CRC32C | header | payload
    index.jsonl    one JSON line per record: round, node, client, n_k, steps, lr, kind, layers

Each record holds what an observer of the traffic learns from one client reply:

* ``kind="gradient"`` (FedSGD): the client's gradient of one batch;
* ``kind="delta"`` (FedAvg): ``theta(t) - theta_k(t)``, the global parameters the client started
  from minus the parameters it returned, with the round's global parameters stored once as a
  ``kind="global"`` record (node ``-1``), so the returned parameters are ``global - delta`` and
  the pseudo-gradient is ``delta / (lr * T)``;
* ``kind="aggregate"`` (node ``-1``, SecAgg+): all a server under secure aggregation receives, the
  round's sample-weighted mean reply (a model), unmasked, before any noise the server adds.

Appends go to the disk at its own speed: the arrays' buffers are handed to one ``writev`` as they
are (no copies, no conversions of float32 data), the checksum is CRC32C (hardware-accelerated, far
faster than the disk, where zlib's CRC32 was the bottleneck: benchmarks/README.md), and the writer keeps its
files open. Durability is per round (group commit): engines and the strategy append a round's
updates with ``sync=False`` and call :meth:`UpdateStore.sync` once, which fsyncs the data and then
writes the round's index lines; a crash loses at most the unfinished round, which a resumed run
drops and redoes anyway. ``sync=True`` (the default) fsyncs each record. Stores written with zlib's
CRC32 (magic ``FSU1``) stay readable.

No recorded update is lost silently. A run killed mid-write leaves a partial frame at the end: readers
(the default mode, ``"r"``) never modify the store and ignore it, so an attack started while a run is
recording cannot cut the record being written; the one writer (``mode="a"``, an exclusive lock) drops
only that torn *final* frame on open, saying how many bytes at which offset, so a resumed run appends
after the last complete update. A frame that fails its checksum anywhere else is not a torn tail: the
scan resynchronises on the next valid frame (its magic, lengths and checksum), warns with the offset
and length of every skipped region (:attr:`UpdateStore.corrupt`), keeps every other record, and never
truncates the file there. :meth:`UpdateStore.read` verifies the frame's checksum again on every read.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np

from fed_ser.io import atomic_write_text
from fed_ser.recording.frames import FRAME, MAGIC, frame_at, next_frame, read_frame, write_all

CLIENT_KINDS = ("gradient", "delta")  # one client's reply
RECORD_KINDS = (*CLIENT_KINDS, "global", "aggregate")


class CorruptRecord(ValueError):
    """A record's bytes no longer match their checksum; the message names the store and the offset."""


@dataclass(frozen=True)
class UpdateInfo:
    """Index entry of one recorded update."""

    round: int
    node: int  # the Flower node that sent it; -1 where none did (the in-process engines, the server's own records)
    client: int  # the client id (the data shard it trains on: Flower's partition-id), -1 for the server's records
    num_examples: int
    steps: int
    lr: float
    kind: str  # one of RECORD_KINDS
    dtype: str
    layers: dict[str, list[int]]
    offset: int = field(default=0, compare=False)  # payload offset in updates.bin
    start: int = field(default=0, compare=False)  # frame offset in updates.bin

    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in ("round", "node", "client", "num_examples", "steps", "lr", "kind", "dtype", "layers", "offset")}
        return json.dumps(d, separators=(",", ":"))


class UpdateStore:
    """The recorded updates in ``path`` (a directory): read-only (``mode="r"``) or as its one writer
    (``mode="a"``, which creates the directory, locks it and repairs a torn tail)."""

    def __init__(self, path: str | Path, mode: str = "r"):
        if mode not in ("r", "a"):
            raise ValueError(f"UpdateStore mode: {mode!r} is not 'r' or 'a'")
        self.path, self.mode = Path(path), mode
        self.data_path = self.path / "updates.bin"
        self.index_path = self.path / "index.jsonl"
        self.records: list[UpdateInfo] = []
        self.recovered_bytes = 0
        self.corrupt: list[tuple[int, int]] = []  # (offset, length) of each region skipped for a failed checksum
        self._lock: int | None = None
        self._fd: int | None = None  # read with positioned reads: no mapping, so page cache is not this process's RSS
        self._wfd: int | None = None  # the writer's open updates.bin (appends)
        self._end = 0  # where the next frame starts
        self._pending: list[str] = []  # index lines of appends not yet synced
        self._old_names = False  # a frame names the client "partition" (the writer then rewrites the index)
        if mode == "r":
            if not self.data_path.exists():
                raise FileNotFoundError(f"{self.path}: no recorded updates (no {self.data_path.name})")
            self._scan()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.path / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise RuntimeError(f"{self.path}: another process is recording into this store") from None
        self._recover()

    # ------------------------------------------------------------------ recovery
    def _record_at(self, fh, pos: int, size: int) -> tuple[UpdateInfo, int] | None:
        """The record whose frame starts at ``pos`` and where the frame ends, or None if no valid frame starts there."""
        found = frame_at(fh, pos, size)
        if found is None:
            return None
        meta, hlen, end = found
        if "partition" in meta:  # older stores called the client id partition
            meta["client"] = meta.pop("partition")
            self._old_names = True
        try:
            return UpdateInfo(**{**meta, "offset": pos + FRAME.size + hlen, "start": pos}), end
        except TypeError:
            return None

    def _scan(self) -> int:
        """Index the valid frames; return where the last one ends (a torn or garbled tail after it is left
        to the writer). A corrupt region between valid frames is skipped, recorded in :attr:`corrupt` and warned of."""
        self.records, self.corrupt = [], []
        size = self.data_path.stat().st_size
        pos = 0
        with open(self.data_path, "rb") as fh:
            while pos < size:
                found = self._record_at(fh, pos, size)
                if found is not None:
                    self.records.append(found[0])
                    pos = found[1]
                    continue
                nxt = next_frame(fh, pos + 1, size)
                if nxt is None:
                    break  # no valid frame after pos: the final frame is torn
                self.corrupt.append((pos, nxt - pos))
                pos = nxt
        if self.corrupt:
            where = ", ".join(f"{n} bytes at offset {o}" for o, n in self.corrupt)
            warnings.warn(f"{self.data_path}: {len(self.corrupt)} corrupt region(s) skipped ({where}): the records there "
                          f"fail their checksum and are left out; the {len(self.records)} valid records are kept",
                          RuntimeWarning, stacklevel=3)
        return pos

    def _recover(self) -> None:
        """The writer's repair: drop a torn final frame (and say so), make the index match the valid frames.
        Corrupt regions between valid frames stay in the file (:meth:`_scan` warned of them)."""
        if not self.data_path.exists():
            self.data_path.touch()
        size = self.data_path.stat().st_size
        good_end = self._scan()
        if good_end < size:
            self.recovered_bytes = size - good_end
            print(f"[fed-ser] {self.data_path}: dropped a torn final frame ({self.recovered_bytes} bytes at offset {good_end}); "
                  f"{len(self.records)} complete records kept", file=sys.stderr, flush=True)
            with open(self.data_path, "r+b") as fh:
                fh.truncate(good_end)
        index_lines = self.index_path.read_text().splitlines() if self.index_path.exists() else []
        if len(index_lines) != len(self.records) or self.recovered_bytes or not self.index_path.exists() or self._old_names:
            atomic_write_text(self.index_path, "".join(r.to_json() + "\n" for r in self.records))
        self._end = good_end

    # ------------------------------------------------------------------ writing
    def append(
        self,
        arrays: dict[str, np.ndarray],
        *,
        round: int,
        node: int = -1,
        client: int = -1,
        num_examples: int = 0,
        steps: int = 1,
        lr: float = 0.0,
        kind: str = "gradient",
        float16: bool = False,
        sync: bool = True,
    ) -> UpdateInfo:
        """Append one update and return its index entry.

        ``sync=False`` skips the fsync (a caller writing a whole round calls :meth:`sync` once at
        its end; a crash before that loses at most the unfinished round, which a resumed run
        truncates and redoes anyway).
        """
        self._writable()
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        dtype = np.dtype(np.float16 if float16 else np.float32)
        # float32 C-contiguous arrays (what the engines hand over) are written from their own buffers
        parts = [np.ascontiguousarray(a, dtype=dtype) for a in arrays.values()]
        views = [memoryview(p).cast("B") for p in parts if p.size]
        plen = sum(p.nbytes for p in parts)
        meta = dict(round=int(round), node=int(node), client=int(client), num_examples=int(num_examples),
                    steps=int(steps), lr=float(lr), kind=kind, dtype=dtype.name,
                    layers={k: list(np.shape(a)) for k, a in arrays.items()})
        header = json.dumps(meta, separators=(",", ":")).encode()
        crc = crc32c.crc32c(header)
        for v in views:
            crc = crc32c.crc32c(v, crc)
        fd = self._writer()
        start = self._end
        write_all(fd, [FRAME.pack(MAGIC, len(header), plen, crc) + header, *views])
        self._end = start + FRAME.size + len(header) + plen
        info = UpdateInfo(**meta, offset=start + FRAME.size + len(header), start=start)
        self.records.append(info)
        self._pending.append(info.to_json() + "\n")
        if sync:
            self.sync()
        return info

    def _writer(self) -> int:
        if self._wfd is None:
            self._wfd = os.open(self.data_path, os.O_WRONLY | os.O_APPEND)
        return self._wfd

    def _writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path}: this store is open read-only (UpdateStore(path, mode='a') records)")

    def sync(self) -> None:
        """Commit the appends so far: fsync the data, then write their index lines (one call a round)."""
        if self._wfd is not None:
            os.fsync(self._wfd)
        if self._pending:
            with open(self.index_path, "a") as fh:
                fh.write("".join(self._pending))
            self._pending = []

    def truncate_after_round(self, last_round: int) -> int:
        """Drop every record of a round after ``last_round`` (a resumed run redoes those rounds).

        Returns how many records were dropped.
        """
        self._writable()
        keep = [r for r in self.records if r.round <= last_round]
        dropped = len(self.records) - len(keep)
        if dropped:
            cut = self.records[len(keep)].start
            self._close_files()
            self._pending = []
            with open(self.data_path, "r+b") as fh:
                fh.truncate(cut)
            self.records, self._end = keep, cut
            atomic_write_text(self.index_path, "".join(r.to_json() + "\n" for r in keep))
        return dropped

    # ------------------------------------------------------------------ reading
    def _reader(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_RDONLY)
        return self._fd

    def read(self, info: UpdateInfo, layers: list[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of one record as float32 (only ``layers`` if given).

        The record's frame is read with one positioned read (``os.pread``: memory holds this frame and the
        arrays asked for, however large the store; an ``mmap`` would count every page it touched in the
        reader's resident memory) and verified against its checksum: bytes changed since the store was
        opened raise :class:`CorruptRecord` naming the offset.
        """
        found = read_frame(self._reader(), info.start)
        if found is None or info.start + FRAME.size + found[1] != info.offset:
            raise CorruptRecord(f"{self.data_path}: the record of round {info.round}, client {info.client} at offset "
                                f"{info.start} fails its checksum (the file changed or is damaged there)")
        frame, hlen = found
        dtype = np.dtype(info.dtype)
        out: dict[str, np.ndarray] = {}
        at = hlen
        for name, shape in info.layers.items():
            count = int(np.prod(shape)) if shape else 1
            if layers is None or name in layers:
                out[name] = np.frombuffer(frame, dtype=dtype, count=count, offset=at).reshape(shape).astype(np.float32)
            at += count * dtype.itemsize
        return out

    def updates(self, kind: str | None = None) -> list[UpdateInfo]:
        """Client updates (not the per-round global or aggregate records), optionally of one kind."""
        return [r for r in self.records if r.kind in CLIENT_KINDS and (kind is None or r.kind == kind)]

    def global_record(self, round: int) -> UpdateInfo | None:
        """The global parameters the server sent in ``round`` (None if not recorded)."""
        return next((r for r in reversed(self.records) if r.kind == "global" and r.round == round), None)

    def aggregate_record(self, round: int) -> UpdateInfo | None:
        """The round's unmasked mean reply under SecAgg+ (None if not recorded)."""
        return next((r for r in reversed(self.records) if r.kind == "aggregate" and r.round == round), None)

    def attack_input(self, info: UpdateInfo, layers: list[str] | None = None) -> dict[str, np.ndarray]:
        """What the attack consumes: the gradient, or the pseudo-gradient ``delta / (lr * T)``."""
        arrays = self.read(info, layers)
        if info.kind == "delta":
            scale = 1.0 / (info.lr * max(info.steps, 1))
            arrays = {k: v * scale for k, v in arrays.items()}
        return arrays

    def bytes_per_update(self) -> float:
        """Mean on-disk bytes per client update (frames of global records excluded)."""
        ups = self.updates()
        if not ups:
            return 0.0
        total = 0
        for r in ups:
            count = sum(int(np.prod(s)) for s in r.layers.values())
            total += count * np.dtype(r.dtype).itemsize + FRAME.size + len(r.to_json())
        return total / len(ups)

    def __len__(self) -> int:
        return len(self.updates())

    def __iter__(self) -> Iterator[UpdateInfo]:
        return iter(self.updates())

    def _close_files(self) -> None:
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Commit pending appends, release the files and the writer's lock."""
        if self._wfd is not None or self._pending:
            self.sync()
        self._close_files()
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the builtins may be gone; the next writer rebuilds the index from the frames
            pass


def max_difference(a: UpdateStore, b: UpdateStore) -> float:
    """Largest element difference between two stores of the same run (e.g. two engines)."""
    return max(difference_by_round(a, b).values(), default=0.0)


def difference_by_round(a: UpdateStore, b: UpdateStore) -> dict[int, float]:
    """Per round, the largest element difference between two stores of the same run.

    Records are matched by (round, client, kind), since a Flower run stores replies in arrival
    order; a mismatch in which updates exist, their step counts or shapes is an error. Two
    float implementations agree to rounding in a round that starts from the same global model;
    over many rounds the rounding differences grow (ReLU units switch), so long runs drift apart.
    """
    def key(u: UpdateInfo) -> tuple:
        return (u.round, u.client, u.kind)

    ua, ub = sorted(a.updates(), key=key), sorted(b.updates(), key=key)
    meta = lambda us: [(u.round, u.client, u.kind, u.steps, u.num_examples) for u in us]
    if meta(ua) != meta(ub):
        raise ValueError(f"{a.path} and {b.path} hold different updates")
    worst: dict[int, float] = {}
    for x, y in zip(ua, ub):
        ra, rb = a.read(x), b.read(y)
        if ra.keys() != rb.keys():
            raise ValueError(f"round {x.round} client {x.client}: layers differ")
        d = max(float(np.abs(ra[k].astype(np.float64) - rb[k]).max()) for k in ra)
        worst[x.round] = max(worst.get(x.round, 0.0), d)
    return worst
