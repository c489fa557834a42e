"""BoundaryTracker: header-to-header skipping over arbitrarily chunked v3 streams."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.pgwire.boundary import BoundaryTracker, ProtocolError


def message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


messages_st = st.lists(
    st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=300)), max_size=20
)


def boundaries_of(msgs: list[tuple[bytes, bytes]]) -> list[int]:
    """Absolute stream offsets at which a message ends."""
    out, pos = [], 0
    for _t, body in msgs:
        pos += 5 + len(body)
        out.append(pos)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


@given(messages_st, st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_arbitrary_chunking_sees_every_header_and_boundary(
    msgs: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    data = b"".join(message(t, b) for t, b in msgs)
    seen: list[tuple[int, int]] = []
    tracker = BoundaryTracker(on_header=lambda t, n: seen.append((t, n)))
    ends = set(boundaries_of(msgs)) | {0}
    pos = 0
    for chunk in split(data, cuts):
        tracker.feed(memoryview(chunk))
        pos += len(chunk)
        assert tracker.at_boundary == (pos in ends)
    assert tracker.messages == len(msgs)
    assert seen == [(t[0], len(b) + 4) for t, b in msgs]
    assert tracker.at_boundary


@given(messages_st)
def test_fed_one_byte_at_a_time_is_at_boundary_exactly_at_message_ends(
    msgs: list[tuple[bytes, bytes]],
) -> None:
    data = b"".join(message(t, b) for t, b in msgs)
    ends = set(boundaries_of(msgs)) | {0}
    tracker = BoundaryTracker()
    for i in range(len(data)):
        tracker.feed(data[i : i + 1])
        assert tracker.at_boundary == (i + 1 in ends)
    assert tracker.messages == len(msgs)


@given(
    messages_st,
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
    st.integers(min_value=0, max_value=10_000),
)
def test_feed_until_boundary_stops_exactly_at_the_next_message_end(
    msgs: list[tuple[bytes, bytes]], cuts: list[int], stop_at: int
) -> None:
    """Feed normally up to an arbitrary offset, then use feed_until_boundary: the
    returned cut must land on the first message end at or after that offset."""
    data = b"".join(message(t, b) for t, b in msgs)
    stop = stop_at % (len(data) + 1)
    tracker = BoundaryTracker()
    for chunk in split(data[:stop], cuts):
        tracker.feed(chunk)
    expected = min(e for e in [*boundaries_of(msgs), 0, len(data)] if e >= stop) if data else 0
    pos = stop
    rest = data[stop:]
    for chunk in split(rest, cuts):
        taken = tracker.feed_until_boundary(chunk)
        assert 0 <= taken <= len(chunk)
        pos += taken
        if tracker.at_boundary:
            break
        assert taken == len(chunk)
    assert tracker.at_boundary
    assert pos == expected


def test_feed_until_boundary_at_boundary_consumes_nothing() -> None:
    tracker = BoundaryTracker()
    tracker.feed(message(b"Z", b"I"))
    assert tracker.feed_until_boundary(message(b"D", b"x" * 10)) == 0
    assert tracker.messages == 1


def test_feed_until_boundary_completes_a_split_header_with_empty_body() -> None:
    tracker = BoundaryTracker()
    data = message(b"S", b"") + message(b"Z", b"I")
    tracker.feed(data[:2])
    assert not tracker.at_boundary
    assert tracker.feed_until_boundary(data[2:]) == 3
    assert tracker.at_boundary
    assert tracker.messages == 1


def test_huge_message_costs_one_header_and_is_skipped_across_chunks() -> None:
    tracker = BoundaryTracker()
    tracker.feed(b"D" + struct.pack("!i", 1_000_000_008))
    for _ in range(100):
        tracker.feed(bytes(10_000_000))
        assert not tracker.at_boundary
    tracker.feed(bytes(4) + message(b"C", b"SELECT 1\x00"))
    assert tracker.at_boundary
    assert tracker.messages == 2


@pytest.mark.parametrize("length", [0, 3, -1, -(2**31)])
def test_length_below_four_is_a_protocol_error(length: int) -> None:
    tracker = BoundaryTracker()
    bad = b"Q" + struct.pack("!i", length)
    with pytest.raises(
        ProtocolError, match=rf"invalid message length {length} for message type 'Q'"
    ):
        tracker.feed(message(b"Z", b"I") + bad)
    assert tracker.messages == 1


def test_invalid_length_in_a_split_header_is_a_protocol_error() -> None:
    tracker = BoundaryTracker()
    tracker.feed(b"\x00\x00")
    with pytest.raises(ProtocolError, match="invalid message length 2 for message type '0x00'"):
        tracker.feed(b"\x00\x00\x02")
    tracker = BoundaryTracker()
    tracker.feed(b"X\x00")
    with pytest.raises(ProtocolError):
        tracker.feed_until_boundary(b"\x00\x00\x01")


def test_protocol_error_carries_08p01() -> None:
    tracker = BoundaryTracker()
    with pytest.raises(ProtocolError) as info:
        tracker.feed(b"Q\x00\x00\x00\x00")
    assert info.value.sqlstate == "08P01"


def test_empty_chunk_changes_nothing() -> None:
    tracker = BoundaryTracker()
    tracker.feed(b"")
    assert tracker.at_boundary and tracker.messages == 0
    tracker.feed(b"Q\x00")
    tracker.feed(b"")
    assert not tracker.at_boundary
    assert tracker.feed_until_boundary(b"") == 0
    assert not tracker.at_boundary


def test_header_callback_counts_query_and_parse_headers() -> None:
    """The statement-logging hook point: a callback sees each client message header."""
    kinds: list[str] = []
    tracker = BoundaryTracker(on_header=lambda t, n: kinds.append(chr(t)))
    stream = (
        message(b"Q", b"select 1\x00")
        + message(b"P", b"\x00select $1\x00\x00\x00")
        + message(b"S", b"")
    )
    tracker.feed(bytearray(stream))
    assert kinds == ["Q", "P", "S"]


def test_chunk_inside_one_body_decodes_no_header() -> None:
    """A chunk that lies wholly inside a message body is accounted without decoding:
    bytes that look like headers there are payload, not messages."""
    seen: list[int] = []
    tracker = BoundaryTracker(on_header=lambda t, n: seen.append(t))
    body = message(b"Q", b"x" * 20) * 10  # header-shaped payload inside a DataRow
    tracker.feed(b"D" + struct.pack("!i", 4 + len(body)))
    for i in range(0, len(body), 7):
        tracker.feed(body[i : i + 7])
    assert seen == [ord("D")]
    assert tracker.at_boundary and tracker.messages == 1


def test_callback_error_propagates_and_counts_only_earlier_messages() -> None:
    def hook(type_byte: int, length: int) -> None:
        if type_byte == ord("P"):
            raise RuntimeError("hook failed")

    tracker = BoundaryTracker(on_header=hook)
    with pytest.raises(RuntimeError, match="hook failed"):
        tracker.feed(message(b"Q", b"a\x00") + message(b"S", b"") + message(b"P", b"b"))
    assert tracker.messages == 2


def test_bad_length_after_a_split_header_counts_messages_before_it() -> None:
    tracker = BoundaryTracker()
    whole = message(b"Q", b"select 1\x00")
    tracker.feed(whole[:3])
    with pytest.raises(ProtocolError, match="message type 'X'"):
        tracker.feed(whole[3:] + message(b"S", b"") + b"X" + struct.pack("!i", 2))
    assert tracker.messages == 2
