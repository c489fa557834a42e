"""MessageReader: framing of typed messages, fed whole, in chunks, byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.pgwire import Message, MessageReader, ProtocolError, build_message

message_st = st.builds(
    Message,
    type=st.binary(min_size=1, max_size=1),
    body=st.binary(max_size=300),
)


def _drain(reader: MessageReader) -> list[Message]:
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    pieces, start = [], 0
    for cut in [*cuts, len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces


@given(messages=st.lists(message_st, max_size=10), data=st.data())
def test_reader_gives_same_messages_whole_chunked_and_bytewise(
    messages: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(m.raw for m in messages)

    whole = MessageReader()
    whole.feed(stream)
    assert _drain(whole) == messages

    chunks = MessageReader()
    got: list[Message] = []
    for piece in data.draw(chunked(stream)):
        chunks.feed(piece)
        got += _drain(chunks)
    assert got == messages

    bytewise = MessageReader()
    got = []
    for i in range(len(stream)):
        bytewise.feed(stream[i : i + 1])
        got += _drain(bytewise)
    assert got == messages
    assert bytewise.buffered == 0


@given(st.binary(max_size=400))
def test_random_bytes_into_reader_raise_only_protocol_error(data: bytes) -> None:
    reader = MessageReader(max_message_size=1000)
    try:
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
            _drain(reader)
    except ProtocolError:
        pass


def test_message_raw_is_type_length_body() -> None:
    assert Message(b"Q", b"select 1\0").raw == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert build_message(b"X") == b"X\x00\x00\x00\x04"


@pytest.mark.parametrize("length", [0, 1, 3])
def test_length_below_four_is_protocol_error(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"Q" + length.to_bytes(4, "big"))
    with pytest.raises(
        ProtocolError, match=f"invalid message length {length} for message type b'Q'"
    ):
        reader.next_message()


def test_length_above_limit_is_refused_before_body_arrives() -> None:
    reader = MessageReader(max_message_size=100)
    reader.feed(b"D" + (101).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="length 101, above the limit of 100 bytes") as info:
        reader.next_message()
    assert info.value.sqlstate == "08P01"


def test_length_at_limit_is_accepted() -> None:
    reader = MessageReader(max_message_size=100)
    reader.feed(build_message(b"D", b"x" * 96))
    assert reader.next_message() == Message(b"D", b"x" * 96)


def test_partial_message_stays_buffered() -> None:
    reader = MessageReader()
    raw = build_message(b"D", b"abcdef")
    reader.feed(raw[:7])
    assert reader.next_message() is None
    assert reader.buffered == 7
    reader.feed(raw[7:] + b"Z")
    assert reader.next_message() == Message(b"D", b"abcdef")
    assert reader.take_buffered() == b"Z"
    assert reader.buffered == 0


def test_long_stream_is_compacted_and_stays_correct() -> None:
    reader = MessageReader()
    body = b"y" * 1000
    raw = build_message(b"d", body)
    count = 0
    for _ in range(300):
        reader.feed(raw + raw[:10])
        reader.feed(raw[10:])
        count += len(_drain(reader))
    assert count == 600
    assert reader.buffered == 0


def test_message_type_must_be_one_byte() -> None:
    with pytest.raises(ValueError, match="exactly one byte"):
        Message(b"QQ", b"")
    with pytest.raises(ValueError, match="at least 4"):
        MessageReader(max_message_size=3)
