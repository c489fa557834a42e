"""First packet: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, direct TLS."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.pgwire import (
    CancelRequest,
    DirectTLS,
    FirstPacketReader,
    GSSENCRequest,
    ProtocolError,
    SSLRequest,
    StartupMessage,
    UnsupportedProtocolVersion,
    build_cancel_request,
    build_gssenc_request,
    build_ssl_request,
    build_startup_message,
    parse_first_packet,
)
from waypoint.pgwire.startup import FirstPacket

name_st = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=20)
value_st = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)
params_st = st.dictionaries(name_st, value_st, max_size=12)
secret_st = st.binary(min_size=4, max_size=256)
pid_st = st.integers(-(2**31), 2**31 - 1)


def _packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!II", len(body) + 8, code) + body


def _startup_body(raw_params: bytes, protocol: int = 3 << 16) -> bytes:
    return _packet(protocol, raw_params)


def _read_all(data: bytes, *, step: int | None = None) -> list[FirstPacket]:
    reader = FirstPacketReader()
    events: list[FirstPacket] = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        if reader.finished:
            break
        reader.feed(piece)
        while not reader.finished and (event := reader.next_event()) is not None:
            events.append(event)
    return events


# ------------------------------------------------------------- round trips


@given(params=params_st, minor=st.integers(0, 5))
def test_startup_message_round_trips(params: dict[str, str], minor: int) -> None:
    raw = build_startup_message(params, (3, minor))
    event = parse_first_packet(raw)
    assert event == StartupMessage((3, minor), params)
    assert isinstance(event, StartupMessage)
    assert list(event.parameters) == list(params)  # wire order kept
    assert _read_all(raw, step=1) == [event]


@given(pid=pid_st, secret=secret_st)
def test_cancel_request_round_trips_with_keys_of_4_to_256_bytes(pid: int, secret: bytes) -> None:
    raw = build_cancel_request(pid, secret)
    assert parse_first_packet(raw) == CancelRequest(pid, secret)
    assert _read_all(raw, step=1) == [CancelRequest(pid, secret)]


def test_ssl_and_gssenc_requests_parse() -> None:
    assert build_ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert parse_first_packet(build_ssl_request()) == SSLRequest()
    assert parse_first_packet(build_gssenc_request()) == GSSENCRequest()


def test_reader_continues_after_refused_ssl_and_gssenc_requests() -> None:
    startup = build_startup_message({"user": "bob"})
    stream = build_gssenc_request() + build_ssl_request() + startup + b"Qtrailing"
    for step in (None, 1, 3):
        assert _read_all(stream, step=step) == [
            GSSENCRequest(),
            SSLRequest(),
            StartupMessage((3, 0), {"user": "bob"}),
        ]
    reader = FirstPacketReader()
    reader.feed(stream)
    while not isinstance(reader.next_event(), StartupMessage):
        pass
    assert reader.finished
    assert reader.take_buffered() == b"Qtrailing"
    with pytest.raises(RuntimeError, match="finished"):
        reader.next_event()


def test_bytes_after_ssl_request_stay_visible_to_the_caller() -> None:
    reader = FirstPacketReader()
    reader.feed(build_ssl_request() + b"injected")
    assert reader.next_event() == SSLRequest()
    assert reader.buffered == len(b"injected")


def test_direct_tls_keeps_every_byte_for_the_tls_layer() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40))
    reader = FirstPacketReader()
    reader.feed(hello[:1])
    event = reader.next_event()
    assert event == DirectTLS(hello[:1])
    assert reader.finished
    assert reader.take_buffered() == hello[:1]
    assert parse_first_packet(hello) == DirectTLS(hello)


def test_direct_tls_is_only_recognised_as_the_first_packet() -> None:
    reader = FirstPacketReader()
    reader.feed(build_ssl_request() + b"\x16\x03\x01\x02\x00")
    assert reader.next_event() == SSLRequest()
    with pytest.raises(ProtocolError, match="invalid length of first packet"):
        reader.next_event()


def test_startup_message_helpers() -> None:
    msg = StartupMessage((3, 2), {"user": "bob", "_pq_.a": "1", "_pq_.b": "2"})
    assert msg.user == "bob" and msg.database == "bob"
    assert msg.protocol_options == ("_pq_.a", "_pq_.b")


# ------------------------------------------------------------- malformed


@pytest.mark.parametrize("length", [0, 4, 7, 10005, 0x7FFFFFFF, 0xFFFFFFFF])
def test_first_packet_length_outside_8_to_10004_is_refused_with_the_length(length: int) -> None:
    reader = FirstPacketReader()
    reader.feed(struct.pack("!I", length))
    with pytest.raises(
        ProtocolError, match=rf"invalid length of first packet: {length} \(must be 8..10004\)"
    ):
        reader.next_event()


def test_first_packet_length_of_10004_is_accepted() -> None:
    value = "x" * (10004 - 8 - len("k\0\0\0"))
    raw = build_startup_message({"k": value})
    assert len(raw) == 10004
    assert parse_first_packet(raw) == StartupMessage((3, 0), {"k": value})
    with pytest.raises(ValueError, match="exceeds the limit of 10004"):
        build_startup_message({"k": value + "x"})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (b"user\0bob\0", "parameter list is missing its final terminator"),
        (b"", "parameter list is missing its final terminator"),
        (b"user", "unterminated parameter name at offset 0"),
        (b"user\0bob\0data", "unterminated parameter name at offset 9"),
        (b"user\0", "parameter 'user' has no value"),
        (b"user\0bob", "unterminated value of parameter 'user'"),
        (b"user\0a\0user\0b\0\0", "duplicate parameter 'user'"),
        (
            b"user\0bob\0\0database\0x\0\0",
            "empty parameter name at offset 9 of the parameter list, followed by 12 more bytes",
        ),
        (
            b"\0\0",
            "empty parameter name at offset 0 of the parameter list, followed by 1 more bytes",
        ),
        (b"us\xffer\0bob\0\0", r"parameter name at offset 0 is not valid UTF-8 \(byte 2\)"),
        (b"user\0b\xc3\0\0", r"value of parameter 'user' is not valid UTF-8 \(byte 1\)"),
    ],
)
def test_malformed_startup_parameters_give_precise_errors(params: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        parse_first_packet(_startup_body(params))
    assert info.value.sqlstate == "08P01"


def test_empty_parameter_list_is_valid() -> None:
    assert parse_first_packet(_startup_body(b"\0")) == StartupMessage((3, 0), {})


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (4, 0), (0, 0), (65535, 1)])
def test_major_version_other_than_3_is_unsupported_0a000(major: int, minor: int) -> None:
    with pytest.raises(
        UnsupportedProtocolVersion,
        match=rf"unsupported frontend protocol {major}\.{minor}: server supports 3\.0 to 3\.2",
    ) as info:
        parse_first_packet(_startup_body(b"\0", (major << 16) | minor))
    assert info.value.sqlstate == "0A000"


def test_newer_minor_version_is_accepted_for_negotiation() -> None:
    assert parse_first_packet(_startup_body(b"\0", (3 << 16) | 7)) == StartupMessage((3, 7), {})


def test_unknown_request_code_is_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unknown request code 1234/5681"):
        parse_first_packet(_packet((1234 << 16) | 5681))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_packet((1234 << 16) | 5679, b"xxxx"), "invalid SSLRequest length 12, expected 8"),
        (_packet((1234 << 16) | 5680, b"x"), "invalid GSSENCRequest length 9, expected 8"),
        (_packet((1234 << 16) | 5678, b"\0\0\0\1abc"), "cancel key must be 4..256 bytes, got 3"),
        (
            _packet((1234 << 16) | 5678, b"\0\0\0\1" + b"k" * 257),
            "cancel key must be 4..256 bytes, got 257",
        ),
        (_packet((1234 << 16) | 5678), "invalid CancelRequest length 8"),
    ],
)
def test_special_requests_with_wrong_length_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_first_packet(raw)


def test_parse_first_packet_refuses_incomplete_and_trailing_data() -> None:
    raw = build_ssl_request()
    with pytest.raises(
        ProtocolError, match="incomplete first packet: length word says 8 bytes, got 6"
    ):
        parse_first_packet(raw[:6])
    with pytest.raises(ProtocolError, match="incomplete first packet: 2 bytes"):
        parse_first_packet(raw[:2])
    with pytest.raises(ProtocolError, match="3 unexpected bytes after a first packet of length 8"):
        parse_first_packet(raw + b"abc")


@given(st.binary(max_size=300))
def test_random_bytes_into_first_packet_parser_raise_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_first_packet(data)
    with contextlib.suppress(ProtocolError):
        _read_all(data, step=1)


@given(st.binary(max_size=200), st.integers(0, 255))
def test_random_bodies_behind_a_valid_length_raise_only_protocol_error(
    body: bytes, first: int
) -> None:
    data = struct.pack("!I", len(body) + 5) + bytes([first]) + body
    with contextlib.suppress(ProtocolError):
        parse_first_packet(data)


def test_builders_refuse_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="cannot be empty"):
        build_startup_message({"": "x"})
    with pytest.raises(ValueError, match="NUL"):
        build_startup_message({"a": "b\0c"})
    with pytest.raises(ValueError, match=r"4\.\.256 bytes, got 3"):
        build_cancel_request(1, b"abc")
    with pytest.raises(ValueError, match="does not fit an Int32"):
        build_cancel_request(2**31, b"abcd")


def test_cancel_request_repr_hides_the_secret() -> None:
    assert "sekrit" not in repr(CancelRequest(7, b"sekrit"))
