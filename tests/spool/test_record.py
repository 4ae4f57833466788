"""Record framing: every valid record is read back; any damage is detected, never mis-read."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from tiled_writer_sidecar.spool import record

payload_lists = st.lists(st.binary(max_size=300), min_size=1, max_size=30)


def _records(data: bytes) -> list[bytes]:
    return [i.payload for i in record.scan(data) if isinstance(i, record.Record)]


@given(payload_lists)
def test_round_trip(payloads: list[bytes]) -> None:
    """Framed payloads scan back identically and nothing is reported corrupt."""
    data = b"".join(record.encode(p) for p in payloads)
    items = list(record.scan(data))
    assert [i.payload for i in items if isinstance(i, record.Record)] == payloads
    assert all(isinstance(i, record.Record) for i in items)


@given(payload_lists, st.data())
def test_truncation_is_a_torn_tail_never_a_wrong_record(payloads: list[bytes], data: st.DataObject) -> None:
    """Cutting the log anywhere yields a prefix of the records, then stops."""
    full = b"".join(record.encode(p) for p in payloads)
    cut = data.draw(st.integers(0, len(full)))
    got = _records(full[:cut])
    assert got == payloads[: len(got)]
    whole = sum(1 for n in _ends(payloads) if n <= cut)
    assert len(got) == whole


def _ends(payloads: list[bytes]) -> list[int]:
    ends, pos = [], 0
    for p in payloads:
        pos += record.HEADER_SIZE + len(p)
        ends.append(pos)
    return ends


@given(payload_lists, st.data())
def test_flipped_bit_is_detected_and_the_rest_survives(payloads: list[bytes], data: st.DataObject) -> None:
    """A flipped bit damages at most the record it is in; it is reported, never returned altered."""
    full = bytearray(b"".join(record.encode(p) for p in payloads))
    pos = data.draw(st.integers(0, len(full) - 1))
    full[pos] ^= 1 << data.draw(st.integers(0, 7))
    items = list(record.scan(bytes(full)))
    got = [i.payload for i in items if isinstance(i, record.Record)]
    # Every returned payload is one that was written (no corrupted payload slips through).
    assert all(p in payloads for p in got)
    # The records entirely before and after the damaged one are all there.
    ends = _ends(payloads)
    damaged = next(i for i, end in enumerate(ends) if pos < end)
    intact = payloads[:damaged] + payloads[damaged + 1 :]
    if damaged < len(payloads) - 1:
        assert any(isinstance(i, record.Corruption) for i in items)
        assert got == intact
    else:
        # Damage in the last record looks like (and is handled as) a torn tail or corruption.
        assert got == intact


@given(st.binary(max_size=2000))
def test_garbage_never_raises(data: bytes) -> None:
    """Arbitrary bytes scan without an exception; every record found verifies."""
    for item in record.scan(data):
        if isinstance(item, record.Record):
            assert record.encode(item.payload) == data[item.offset : item.end]


SALT = b"segment!"


def _payload_hiding_records(with_segment_salt: bool = True) -> bytes:
    """A payload that embeds whole encoded records: v2 with the default salt (and with the
    segment's own salt, which only the segment's writer knows, if asked), and v1."""
    inner = [b"injected start ../../evil", b"injected event for an unknown descriptor"]
    salts = [bytes(record.SALT_SIZE), b"other!!!"] + ([SALT] if with_segment_salt else [])
    return b"prefix" + b"".join(
        b"".join(record.encode(p, salt) for salt in salts) + record.encode_v1(p) for p in inner
    )


def test_records_embedded_in_a_payload_never_surface() -> None:
    """A payload holding encoded records (even with this segment's salt) is read back as one record."""
    outer = [b"before", _payload_hiding_records(), b"after"]
    data = b"".join(record.encode(p, SALT) for p in outer)
    items = list(record.scan(data, salt=SALT))
    assert [i.payload for i in items if isinstance(i, record.Record)] == outer
    assert all(isinstance(i, record.Record) for i in items)


@given(st.data())
def test_a_damaged_header_resynchronises_on_the_next_real_header(data: st.DataObject) -> None:
    """Any bit flipped in a header loses exactly that record; records embedded in its payload
    (written without this segment's salt) are never mistaken for the next one."""
    outer = [b"first", _payload_hiding_records(with_segment_salt=False), b"third", b"fourth"]
    full = bytearray(b"".join(record.encode(p, SALT) for p in outer))
    victim = data.draw(st.integers(0, len(outer) - 1))
    start = sum(record.HEADER_SIZE + len(p) for p in outer[:victim])
    bit = data.draw(st.integers(0, record.HEADER_SIZE * 8 - 1))
    full[start + bit // 8] ^= 1 << (bit % 8)
    items = list(record.scan(bytes(full), salt=SALT))
    got = [i.payload for i in items if isinstance(i, record.Record)]
    assert got == outer[:victim] + outer[victim + 1 :]
    if victim < len(outer) - 1:
        damage = [i for i in items if isinstance(i, record.Corruption)]
        assert [(d.offset, d.length) for d in damage] == [(start, record.HEADER_SIZE + len(outer[victim]))]


def test_a_damaged_payload_is_damage_of_exactly_that_record() -> None:
    """A payload whose CRC fails is reported as one range, the record's own, and skipped by its length."""
    outer = [b"one", _payload_hiding_records(), b"three"]
    full = bytearray(b"".join(record.encode(p, SALT) for p in outer))
    start = record.HEADER_SIZE + len(outer[0])
    full[start + record.HEADER_SIZE + 10] ^= 0x40
    items = list(record.scan(bytes(full), salt=SALT))
    assert [i.payload for i in items if isinstance(i, record.Record)] == [b"one", b"three"]
    assert [(i.offset, i.length) for i in items if isinstance(i, record.Corruption)] == [
        (start, record.HEADER_SIZE + len(outer[1]))
    ]


def test_a_header_beyond_max_payload_never_verifies() -> None:
    """A header claiming more than MAX_PAYLOAD is damage, even with a valid CRC; nothing is allocated."""
    head = record.HEADER.pack(record.MAGIC, record.MAX_PAYLOAD + 1, 0, 0)[:12]
    crc = zlib.crc32(head, record.seed(SALT)).to_bytes(4, "little")
    data = head + crc + record.encode(b"next", SALT)
    items = list(record.scan(data, salt=SALT))
    assert [type(i).__name__ for i in items] == ["Corruption", "Record"]


def test_v1_records_still_scan() -> None:
    """The v1 scanner reads v1 framing (records written by the previous release)."""
    payloads = [b"a", b"bb" * 100, b""]
    items = list(record.scan_v1(b"".join(record.encode_v1(p) for p in payloads)))
    assert [i.payload for i in items if isinstance(i, record.RecordV1)] == payloads


def test_file_header_survives_one_damaged_copy() -> None:
    """The salt is read from the second copy when the first is damaged; None when both are."""
    header = bytearray(record.file_header(SALT))
    header[3] ^= 1
    assert record.read_file_header(bytes(header)) == SALT
    header[record.FILE_HEADER_SIZE // 2 + 12] ^= 1
    assert record.read_file_header(bytes(header)) is None


def test_scan_of_a_whole_segment_file_uses_its_file_header() -> None:
    """`scan` of a segment file's bytes reads its salt from the file header; offsets are file offsets."""
    data = record.file_header(SALT) + record.encode(b"one", SALT) + record.encode(b"two", SALT)
    items = list(record.scan(data))
    assert [(i.offset, i.payload) for i in items if isinstance(i, record.Record)] == [
        (record.FILE_HEADER_SIZE, b"one"),
        (record.FILE_HEADER_SIZE + record.HEADER_SIZE + 3, b"two"),
    ]
