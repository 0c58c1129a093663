"""The frame format of the update store (``updates.bin``): one frame per record.

    MAGIC (4 bytes) | header length (uint32) | payload length (uint64) | checksum (uint32) | header (JSON) | payload

The checksum covers header and payload: CRC32C for ``FSU2`` frames, zlib's CRC32 for ``FSU1`` (the
stores of fed-ser's first frame format, still read). A frame is valid only if its magic is known, it ends within the file and its
checksum matches; :func:`next_frame` finds the next valid frame after a damaged one.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import crc32c

MAGIC = b"FSU2"  # frames checksummed with CRC32C
CHECKSUMS = {MAGIC: crc32c.crc32c, b"FSU1": zlib.crc32}
FRAME = struct.Struct("<4sIQI")  # magic, header length, payload length, checksum
_SEARCH = 1 << 20  # bytes read at a time while looking for the next frame after a damaged one


def frame_at(fh, pos: int, size: int) -> tuple[dict, int, int] | None:
    """``(header, header length, end)`` of the valid frame starting at ``pos`` of the open file ``fh`` (``size``
    bytes long), or None where no valid frame starts."""
    if pos + FRAME.size > size:
        return None
    fh.seek(pos)
    magic, hlen, plen, crc = FRAME.unpack(fh.read(FRAME.size))
    checksum = CHECKSUMS.get(magic)
    end = pos + FRAME.size + hlen + plen
    if checksum is None or end > size:
        return None
    header = fh.read(hlen)
    if checksum(fh.read(plen), checksum(header)) != crc:
        return None
    try:
        meta = json.loads(header)
    except ValueError:
        return None
    return (meta, hlen, end) if isinstance(meta, dict) else None


def next_frame(fh, pos: int, size: int) -> int | None:
    """Where the first valid frame at or after ``pos`` starts (a known magic whose frame checks out), or None."""
    while pos < size:
        fh.seek(pos)
        chunk = fh.read(_SEARCH + FRAME.size)
        for i in sorted(i for m in CHECKSUMS for i in _find_all(chunk, m) if i < _SEARCH):
            if frame_at(fh, pos + i, size) is not None:
                return pos + i
        pos += _SEARCH
    return None


def read_frame(fd: int, start: int) -> tuple[bytes, int] | None:
    """``(header + payload, header length)`` of the frame at ``start`` if its checksum matches, else None."""
    head = os.pread(fd, FRAME.size, start)
    if len(head) != FRAME.size:
        return None
    magic, hlen, plen, crc = FRAME.unpack(head)
    checksum = CHECKSUMS.get(magic)
    if checksum is None:
        return None
    frame = os.pread(fd, hlen + plen, start + FRAME.size)
    if len(frame) != hlen + plen or checksum(memoryview(frame)[hlen:], checksum(memoryview(frame)[:hlen])) != crc:
        return None
    return frame, hlen


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def write_all(fd: int, buffers: list) -> None:
    """``writev`` every buffer, continuing after a short write (a signal, a full pipe)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.writev(fd, views[:1024])  # IOV_MAX
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
