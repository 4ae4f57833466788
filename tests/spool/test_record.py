"""Record framing: every valid record is read back; any damage is detected, never mis-read."""

from __future__ import annotations

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
