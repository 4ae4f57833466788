"""Record framing for spool segments.

A record is ``MAGIC (2 bytes) | length (u32 LE) | crc32 (u32 LE) | payload``.
The CRC (zlib CRC-32) covers the length field and the payload, so a flipped
bit in either is detected. `scan` walks a buffer and yields what it finds:

- `Record`: a complete record whose CRC matches;
- `Corruption`: bytes that are not a valid record. The scanner resynchronises
  by searching forward for the next MAGIC whose record verifies, so one bad
  record never hides the good ones after it; the skipped range is reported.
- a torn tail: the buffer ends inside a record. `scan` stops there and
  returns the offset; whether that is a record still being written (reader
  of a live segment) or a crash remnant (writer opening a segment) is the
  caller's decision.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"\xb1\x5d"
HEADER = struct.Struct("<2sII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 30


def encode(payload: bytes) -> bytes:
    """Frame one payload as a record."""
    length = len(payload)
    if length > MAX_PAYLOAD:
        raise ValueError(f"record payload of {length} bytes exceeds {MAX_PAYLOAD}")
    length_bytes = length.to_bytes(4, "little")
    crc = zlib.crc32(payload, zlib.crc32(length_bytes))
    return HEADER.pack(MAGIC, length, crc) + payload


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    payload: bytes

    @property
    def end(self) -> int:
        return self.offset + HEADER_SIZE + len(self.payload)


@dataclass(frozen=True, slots=True)
class Corruption:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _verify_at(buf: memoryview, pos: int) -> int:
    """Length of the valid record at `pos`; -1 if invalid; -2 if it runs past the end."""
    if len(buf) - pos < HEADER_SIZE:
        return -2
    magic, length, crc = HEADER.unpack_from(buf, pos)
    if magic != MAGIC or length > MAX_PAYLOAD:
        return -1
    end = pos + HEADER_SIZE + length
    if end > len(buf):
        return -2
    actual = zlib.crc32(buf[pos + HEADER_SIZE : end], zlib.crc32(buf[pos + 2 : pos + 6]))
    return length if actual == crc else -1


def scan(data: bytes, base: int = 0) -> Iterator[Record | Corruption]:
    """Yield records and corruptions in `data`; stop at a torn tail.

    `base` is the file offset of ``data[0]``. Where scanning stopped is the
    last item's `end` (or `base` if nothing was yielded): everything after it
    is a torn tail, a record cut short with no valid record behind it.
    """
    buf = memoryview(data)
    pos = 0
    size = len(buf)
    while pos < size:
        length = _verify_at(buf, pos)
        if length >= 0:
            end = pos + HEADER_SIZE + length
            yield Record(base + pos, bytes(buf[pos + HEADER_SIZE : end]))
            pos = end
            continue
        following = _next_valid(data, pos + 1)
        if following < 0:
            if length == -2 and _plausible_tail(buf, pos):
                return
            following = _next_tail_candidate(data, pos + 1)
            yield Corruption(base + pos, (following if following >= 0 else size) - pos)
            if following < 0:
                return
        else:
            yield Corruption(base + pos, following - pos)
        pos = following


def _plausible_tail(buf: memoryview, pos: int) -> bool:
    """True if the bytes from `pos` to the end could be a record cut short."""
    remaining = bytes(buf[pos : pos + 2])
    return MAGIC.startswith(remaining)


def _next_valid(data: bytes, start: int) -> int:
    """Offset of the next verifiable record at or after `start`, or -1."""
    buf = memoryview(data)
    pos = data.find(MAGIC, start)
    while pos >= 0:
        if _verify_at(buf, pos) >= 0:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return -1


def _next_tail_candidate(data: bytes, start: int) -> int:
    """Offset of the first MAGIC at or after `start` that runs past the end, or -1."""
    buf = memoryview(data)
    pos = data.find(MAGIC, start)
    while pos >= 0:
        if _verify_at(buf, pos) == -2:
            return pos
        pos = data.find(MAGIC, pos + 1)
    if data.endswith(MAGIC[:1]) and len(data) > start:
        return len(data) - 1
    return -1
