"""Record framing for spool segments (format v2; v1 is still read).

Format v2, its invariants:

- A segment file starts with a file header, written twice: ``b"TWSPOOL2" |
  salt (8 random bytes) | crc32`` = 20 bytes, so records start at
  `FILE_HEADER_SIZE` (40).
- A record is ``MAGIC (4) | length (u32) | payload crc32 (u32) | header
  crc32 (u32) | payload`` (little-endian, `HEADER_SIZE` = 16). The header CRC
  covers the segment's salt and the header's first 12 bytes. A header is
  *verified* when its magic and CRC match and ``length <= MAX_PAYLOAD``.
- Reading is linear in bytes: a verified header's payload is read whole by
  its length and never searched inside; a payload whose CRC fails is damage
  of exactly that record, skipped by its length. Only a header that does not
  verify starts a forward scan for the next one that does (16-byte CRC per
  candidate). Nothing is allocated beyond what the file holds.
- A record running past the end of the file, or bytes after the last item
  with no verified header, are a *tail*: a record being written, a crash
  remnant or a damaged last record. The writer cuts only crash remnants
  (less than a header, a verified header whose payload is short, zeros); a
  damaged record is kept and reported, so an offset a reader passed is
  never reused.
- Both header copies damaged (one overwrite of the first 40 bytes takes
  both): every record header is a further copy of the seed, since a header
  CRC determines the seed it was made with (`seed_of`). The first record
  whose payload CRC matches gives it back (`recover_seed`); the format is
  unchanged, so every v2 segment, old or new, has as many seed copies as
  records, spread over the whole file.
- v1 segments (``MAGIC1 (2) | length (u32) | crc32 of length and payload
  (u32) | payload``, no v2 file header, MAGIC1 at 0) are read whole by
  `scan_v1`, only if no larger than a segment can be (see segment.py), and
  never appended to. Why a salt: docs/design.md, "The spool".
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

# ------------------------------------------------------------------ v2 format
SEGMENT_MAGIC: Final = b"TWSPOOL2"
_FILE_HEADER = struct.Struct("<8s8sI")
FILE_HEADER_SIZE: Final = 2 * _FILE_HEADER.size
SALT_SIZE: Final = 8

MAGIC: Final = b"\xb2\x5dR2"
_HEAD = struct.Struct("<4sII")  # magic, length, payload crc: what the header CRC covers
HEADER: Final = struct.Struct("<4sIII")
HEADER_SIZE: Final = HEADER.size
MAX_PAYLOAD: Final = 1 << 30
#: Bytes read at once; larger payloads are read with one read of their own.
READ_CHUNK: Final = 4 * 2**20

# ------------------------------------------------------------------ v1 format
MAGIC1: Final = b"\xb1\x5d"
HEADER1: Final = struct.Struct("<2sII")
HEADER1_SIZE: Final = HEADER1.size


def new_salt() -> bytes:
    return os.urandom(SALT_SIZE)


def seed(salt: bytes) -> int:
    """The starting value of a segment's header CRCs."""
    return zlib.crc32(salt)


def file_header(salt: bytes) -> bytes:
    """The v2 file header of a segment with this salt (both copies)."""
    one = _FILE_HEADER.pack(SEGMENT_MAGIC, salt, zlib.crc32(SEGMENT_MAGIC + salt))
    return one + one


def read_file_header(data: bytes) -> bytes | None:
    """The salt of a v2 segment from its first `FILE_HEADER_SIZE` bytes; None if no copy verifies."""
    size = _FILE_HEADER.size
    for start in (0, size):
        if len(data) >= start + size:
            magic, salt, crc = _FILE_HEADER.unpack_from(data, start)
            if magic == SEGMENT_MAGIC and crc == zlib.crc32(magic + salt):
                return bytes(salt)
    return None


def _seed_solver() -> list[int]:
    """Columns of the inverse of ``seed -> crc32(12 bytes, seed)``, linear over GF(2) (see `seed_of`)."""
    zero = zlib.crc32(bytes(12), 0)
    columns = [zlib.crc32(bytes(12), 1 << bit) ^ zero for bit in range(32)]  # M e_bit
    # Gauss-Jordan on [M | I], rows as (M row bits, I row bits), solving M s = e_k for every k.
    rows = [(sum(((columns[bit] >> row) & 1) << bit for bit in range(32)), 1 << row) for row in range(32)]
    for bit in range(32):
        pivot = next(r for r in range(bit, 32) if (rows[r][0] >> bit) & 1)
        rows[bit], rows[pivot] = rows[pivot], rows[bit]
        for r in range(32):
            if r != bit and (rows[r][0] >> bit) & 1:
                rows[r] = (rows[r][0] ^ rows[bit][0], rows[r][1] ^ rows[bit][1])
    # Row `bit` now says: s_bit = XOR of the target's bits in rows[bit][1].
    return [sum(((rows[bit][1] >> k) & 1) << bit for bit in range(32)) for k in range(32)]


_SEED_COLUMNS: Final = _seed_solver()


def seed_of(head: bytes) -> int:
    """The header CRC seed under which the record header `head` verifies (exactly one exists).

    ``crc32(data, seed)`` is ``M seed ^ crc32(data, 0)`` for a fixed-length
    `data`, with M invertible over GF(2): every record header is a further copy
    of its segment's seed, found from its 16 bytes alone.
    """
    target = int.from_bytes(head[12:16], "little") ^ zlib.crc32(head[:12], 0)
    seed = 0
    for k in range(32):
        if (target >> k) & 1:
            seed ^= _SEED_COLUMNS[k]
    return seed


def recover_seed(window: bytes, max_candidates: int = 64) -> tuple[int, int] | None:
    """(offset, seed) of the first record in `window` whose payload CRC matches, seed found by `seed_of`.

    For a segment whose two file header copies are both damaged: `window`
    is read from `FILE_HEADER_SIZE` on; a payload running past it is not
    tried (at most `max_candidates` magics are).
    """
    found = window.find(MAGIC)
    for _ in range(max_candidates):
        if found < 0 or found + HEADER_SIZE > len(window):
            return None
        _, length, payload_crc, _ = HEADER.unpack_from(window, found)
        start = found + HEADER_SIZE
        if start + length <= len(window) and zlib.crc32(window[start : start + length]) == payload_crc:
            return found, seed_of(window[found : found + HEADER_SIZE])
        found = window.find(MAGIC, found + 1)
    return None


def encode(payload: bytes, salt: bytes = bytes(SALT_SIZE)) -> bytes:
    """Frame one payload as a v2 record of a segment with `salt`."""
    return frame(payload, seed(salt))


def frame(payload: bytes, header_seed: int) -> bytes:
    """Frame one payload for the segment whose header CRC seed is `header_seed`."""
    length = len(payload)
    if length > MAX_PAYLOAD:
        raise ValueError(f"record payload of {length} bytes exceeds {MAX_PAYLOAD}")
    head = _HEAD.pack(MAGIC, length, zlib.crc32(payload))
    return head + zlib.crc32(head, header_seed).to_bytes(4, "little") + payload


def verify_header(head: bytes, header_seed: int) -> bool:
    """Whether `head` (`HEADER_SIZE` bytes) is a verified v2 record header."""
    if len(head) < HEADER_SIZE:
        return False
    magic, length, _, header_crc = HEADER.unpack_from(head)
    return bool(magic == MAGIC and length <= MAX_PAYLOAD and zlib.crc32(head[:12], header_seed) == header_crc)


def encode_v1(payload: bytes) -> bytes:
    """A v1 record (only to write test spools as the previous release did)."""
    length_bytes = len(payload).to_bytes(4, "little")
    return HEADER1.pack(MAGIC1, len(payload), zlib.crc32(payload, zlib.crc32(length_bytes))) + payload


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


#: ``read_at(offset, size)``: up to `size` bytes of the segment from `offset`.
ReadAt = Callable[[int, int], bytes]


def bytes_reader(data: bytes) -> ReadAt:
    view = memoryview(data)
    return lambda offset, size: bytes(view[offset : offset + size])


def fd_reader(fd: int) -> ReadAt:
    return lambda offset, size: os.pread(fd, size, offset)


def scan_v2(
    read_at: ReadAt, start: int, end: int, header_seed: int, max_length: int = MAX_PAYLOAD
) -> Iterator[Record | Corruption]:
    """Yield the records and damaged ranges of a v2 segment between `start` and `end`.

    Stops at a tail (see the module docstring): where it stopped is the last
    item's `end`, or `start` if nothing was yielded. A header whose length is
    over `max_length` does not verify: no read is ever sized larger.
    """
    buf = b""
    buf_start = start
    pos = start
    crc32 = zlib.crc32
    unpack = HEADER.unpack_from
    while end - pos >= HEADER_SIZE:
        rel = pos - buf_start
        if rel + HEADER_SIZE > len(buf):
            buf, buf_start, rel = read_at(pos, min(READ_CHUNK, end - pos)), pos, 0
            if len(buf) < HEADER_SIZE:  # the file shrank under us (a write rolled back): a tail
                return
        magic, length, payload_crc, header_crc = unpack(buf, rel)
        if magic != MAGIC or length > max_length or crc32(buf[rel : rel + 12], header_seed) != header_crc:
            following = _resync(read_at, pos + 1, end, header_seed, max_length)
            if following < 0:
                return
            yield Corruption(pos, following - pos)
            pos = following
            continue
        record_end = pos + HEADER_SIZE + length
        if record_end > end:
            return
        first = rel + HEADER_SIZE
        if first + length <= len(buf):
            payload = buf[first : first + length]
        elif length >= READ_CHUNK // 2:
            payload = read_at(pos + HEADER_SIZE, length)
        else:
            buf, buf_start = read_at(pos, min(READ_CHUNK, end - pos)), pos
            payload = buf[HEADER_SIZE : HEADER_SIZE + length]
        if len(payload) != length:  # the file shrank under us: stop as at a tail
            return
        if crc32(payload) == payload_crc:
            yield Record(pos, payload)
        else:
            yield Corruption(pos, HEADER_SIZE + length)
        pos = record_end


def _resync(read_at: ReadAt, start: int, end: int, header_seed: int, max_length: int = MAX_PAYLOAD) -> int:
    """Offset of the next verified header at or after `start` (before `end`), or -1."""
    pos = start
    while end - pos >= HEADER_SIZE:
        window = read_at(pos, min(READ_CHUNK, end - pos))
        found = window.find(MAGIC)
        while 0 <= found <= len(window) - HEADER_SIZE:
            _, length, _, header_crc = HEADER.unpack_from(window, found)
            if length <= max_length and zlib.crc32(window[found : found + 12], header_seed) == header_crc:
                return pos + found
            found = window.find(MAGIC, found + 1)
        if len(window) < HEADER_SIZE:
            return -1
        pos += len(window) - HEADER_SIZE + 1  # a header across the window's end is seen next time
    return -1


def scan(data: bytes, base: int = 0, salt: bytes | None = None) -> Iterator[Record | Corruption]:
    """`scan_v2` over a buffer; `base` is the file offset of ``data[0]``.

    Without `salt`, a buffer that starts with a v2 file header (a whole
    segment file) is scanned with that segment's salt from the first record;
    any other buffer with the default salt (records framed by `encode`).
    """
    start = 0
    if salt is None:
        salt = read_file_header(data[:FILE_HEADER_SIZE]) if len(data) >= FILE_HEADER_SIZE else None
        start = 0 if salt is None else FILE_HEADER_SIZE
        salt = bytes(SALT_SIZE) if salt is None else salt
    for item in scan_v2(bytes_reader(data), start, len(data), seed(salt)):
        if isinstance(item, Record):
            yield Record(base + item.offset, item.payload)
        else:
            yield Corruption(base + item.offset, item.length)


# --------------------------------------------------------------- v1 (legacy)


@dataclass(frozen=True, slots=True)
class RecordV1:
    offset: int
    payload: bytes

    @property
    def end(self) -> int:
        return self.offset + HEADER1_SIZE + len(self.payload)


def _verify_v1(buf: memoryview, pos: int) -> int:
    """Length of the valid v1 record at `pos`; -1 if invalid; -2 if it runs past the end."""
    if len(buf) - pos < HEADER1_SIZE:
        return -2
    magic, length, crc = HEADER1.unpack_from(buf, pos)
    if magic != MAGIC1 or length > MAX_PAYLOAD:
        return -1
    end = pos + HEADER1_SIZE + length
    if end > len(buf):
        return -2
    actual = zlib.crc32(buf[pos + HEADER1_SIZE : end], zlib.crc32(buf[pos + 2 : pos + 6]))
    return length if actual == crc else -1


def scan_v1(data: bytes, base: int = 0) -> Iterator[RecordV1 | Corruption]:
    """The v1 scanner, over a whole segment (from a record boundary to its end).

    Given the whole rest of the segment, a valid record is always verified
    whole and skipped by its length; searching (for MAGIC1) happens only
    after damage, as v1 did. A tail is left as in `scan_v2`.
    """
    buf = memoryview(data)
    pos = 0
    size = len(buf)
    while pos < size:
        length = _verify_v1(buf, pos)
        if length >= 0:
            end = pos + HEADER1_SIZE + length
            yield RecordV1(base + pos, bytes(buf[pos + HEADER1_SIZE : end]))
            pos = end
            continue
        following = _next_valid_v1(data, pos + 1)
        if following < 0:
            if length == -2 and MAGIC1.startswith(bytes(buf[pos : pos + 2])):
                return
            following = _next_tail_candidate_v1(data, pos + 1)
            yield Corruption(base + pos, (following if following >= 0 else size) - pos)
            if following < 0:
                return
        else:
            yield Corruption(base + pos, following - pos)
        pos = following


def _next_valid_v1(data: bytes, start: int) -> int:
    buf = memoryview(data)
    pos = data.find(MAGIC1, start)
    while pos >= 0:
        if _verify_v1(buf, pos) >= 0:
            return pos
        pos = data.find(MAGIC1, pos + 1)
    return -1


def _next_tail_candidate_v1(data: bytes, start: int) -> int:
    buf = memoryview(data)
    pos = data.find(MAGIC1, start)
    while pos >= 0:
        if _verify_v1(buf, pos) == -2:
            return pos
        pos = data.find(MAGIC1, pos + 1)
    if data.endswith(MAGIC1[:1]) and len(data) > start:
        return len(data) - 1
    return -1
