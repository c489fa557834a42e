"""Startup-phase messages: every builder round-trips through its parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.pgwire import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    ErrorResponse,
    Message,
    MessageReader,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ProtocolError,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    Terminate,
    build_error_response,
    parse_backend_message,
    parse_password_message,
    parse_sasl_initial_response,
    parse_sasl_response,
    parse_terminate,
)

text_st = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=50)
nonempty_text_st = text_st.filter(bool)
field_code_st = st.characters(min_codepoint=1, max_codepoint=127)
fields_st = st.dictionaries(field_code_st, text_st, max_size=18)


def _one(raw: bytes) -> Message:
    reader = MessageReader()
    reader.feed(raw)
    msg = reader.next_message()
    assert msg is not None and reader.buffered == 0
    return msg


backend_st = st.one_of(
    st.just(AuthenticationOk()),
    st.just(AuthenticationCleartextPassword()),
    st.builds(AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(AuthenticationSASL, st.lists(nonempty_text_st, min_size=1, max_size=4)),
    st.builds(AuthenticationSASLContinue, st.binary(max_size=100)),
    st.builds(AuthenticationSASLFinal, st.binary(max_size=100)),
    st.builds(AuthenticationOther, st.sampled_from([2, 6, 7, 8, 9, 42]), st.binary(max_size=20)),
    st.builds(ParameterStatus, text_st, text_st),
    st.builds(
        BackendKeyData, st.integers(-(2**31), 2**31 - 1), st.binary(min_size=4, max_size=256)
    ),
    st.builds(ReadyForQuery, st.sampled_from([b"I", b"T", b"E"])),
    st.builds(ErrorResponse, fields_st),
    st.builds(NoticeResponse, fields_st),
    st.builds(NegotiateProtocolVersion, st.integers(0, 0xFFFF), st.lists(text_st, max_size=5)),
)


@given(backend_st)
def test_backend_messages_round_trip(message: object) -> None:
    raw = message.encode()  # type: ignore[attr-defined]
    assert parse_backend_message(_one(raw)) == message


@given(fields_st)
def test_error_response_keeps_every_field_in_order(fields: dict[str, str]) -> None:
    parsed = parse_backend_message(_one(ErrorResponse(fields).encode()))
    assert isinstance(parsed, ErrorResponse)
    assert list(parsed.fields.items()) == list(fields.items())


def test_backend_strings_in_another_encoding_survive_round_trip() -> None:
    raw = b"S" + (4 + 22).to_bytes(4, "big") + b"application_name\0caf\xe9\0"
    parsed = parse_backend_message(_one(raw))
    assert isinstance(parsed, ParameterStatus)
    assert parsed.encode() == raw


def test_build_error_response_sets_s_and_v_like_postgres() -> None:
    raw = build_error_response("FATAL", "28000", "not authorized", detail="why", hint="ask")
    parsed = parse_backend_message(_one(raw))
    assert isinstance(parsed, ErrorResponse)
    assert dict(parsed.fields) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28000",
        "M": "not authorized",
        "D": "why",
        "H": "ask",
    }
    assert (parsed.severity, parsed.sqlstate, parsed.message, parsed.detail, parsed.hint) == (
        "FATAL",
        "28000",
        "not authorized",
        "why",
        "ask",
    )
    notice = parse_backend_message(_one(build_error_response("WARNING", "01000", "w", notice=True)))
    assert isinstance(notice, NoticeResponse) and notice.detail is None
    with pytest.raises(ValueError, match="SQLSTATE"):
        build_error_response("FATAL", "280", "x")


@given(password=text_st)
def test_password_message_round_trips_and_hides_password(password: str) -> None:
    msg = PasswordMessage(password)
    assert parse_password_message(_one(msg.encode())) == msg
    if len(password) > 3:
        # The repr shows no field at all; a password that is a piece of the class name
        # ("Mess") is in any repr, which says nothing.
        assert repr(msg) == "PasswordMessage()"


@given(mechanism=nonempty_text_st, data=st.none() | st.binary(max_size=200))
def test_sasl_initial_response_round_trips(mechanism: str, data: bytes | None) -> None:
    msg = SASLInitialResponse(mechanism, data)
    assert parse_sasl_initial_response(_one(msg.encode())) == msg


@given(data=st.binary(max_size=200))
def test_sasl_response_round_trips(data: bytes) -> None:
    assert parse_sasl_response(_one(SASLResponse(data).encode())) == SASLResponse(data)


def test_terminate_round_trips() -> None:
    assert Terminate().encode() == b"X\x00\x00\x00\x04"
    assert parse_terminate(_one(Terminate().encode())) == Terminate()
    with pytest.raises(ProtocolError, match="malformed Terminate: 1 unexpected bytes"):
        parse_terminate(Message(b"X", b"x"))


def test_negotiate_protocol_version_wire_format() -> None:
    raw = NegotiateProtocolVersion(2, ("_pq_.a",)).encode()
    assert raw == b"v\x00\x00\x00\x13\x00\x03\x00\x02\x00\x00\x00\x01_pq_.a\x00"


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (
            Message(b"R", b"\0\0"),
            "malformed Authentication message: truncated before the request code",
        ),
        (
            Message(b"R", b"\0\0\0\0x"),
            "malformed Authentication message: 1 unexpected bytes at the end",
        ),
        (Message(b"R", b"\0\0\0\x05ab"), "truncated in the MD5 salt"),
        (Message(b"R", b"\0\0\0\x0a\0"), "empty SASL mechanism list"),
        (Message(b"R", b"\0\0\0\x0aSCRAM"), "unterminated SASL mechanism list"),
        (Message(b"S", b"a\0b"), "malformed ParameterStatus: unterminated parameter value"),
        (Message(b"K", b"\0\0\0\x01ab"), "malformed BackendKeyData: cancel key of 2 bytes"),
        (Message(b"K", b"\0\0\0\x01" + b"k" * 257), "cancel key of 257 bytes"),
        (Message(b"Z", b"X"), "unknown transaction status"),
        (Message(b"Z", b"II"), "body of 2 bytes, expected 1"),
        (
            Message(b"E", b"Mx\0"),
            "malformed ErrorResponse: truncated before the field list terminator",
        ),
        (Message(b"E", b"Mx"), "unterminated value of field 'M'"),
        (Message(b"E", b"Mx\0My\0\0"), "duplicate field 'M'"),
        (Message(b"N", b"\0z"), "malformed NoticeResponse: 1 unexpected bytes"),
        (Message(b"v", b"\0\3\0\0\0\0\0\x05a\0"), "option count 5 exceeds the 2 remaining bytes"),
        (Message(b"v", b"\0\3\0\0\xff\xff\xff\xff"), "negative option count -1"),
        (Message(b"v", b"\0\0\0\0\0\0\0\0"), r"protocol version 0\.0 is not 3\.x"),
        (Message(b"v", b"\xff\xff\xff\xff\0\0\0\0"), r"protocol version 65535\.65535 is not 3\.x"),
        (Message(b"D", b""), "unexpected backend message type b'D' during startup"),
    ],
)
def test_malformed_backend_messages_give_precise_errors(msg: Message, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_backend_message(msg)


@given(type_=st.sampled_from(list(b"RSKZENv")), body=st.binary(max_size=100))
def test_random_backend_bodies_raise_only_protocol_error(type_: int, body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_backend_message(Message(bytes([type_]), body))


@given(body=st.binary(max_size=100))
def test_random_frontend_bodies_raise_only_protocol_error(body: bytes) -> None:
    for parse in (parse_password_message, parse_sasl_initial_response, parse_sasl_response):
        with contextlib.suppress(ProtocolError):
            parse(Message(b"p", body))


def test_sasl_initial_response_with_negative_length_is_refused() -> None:
    with pytest.raises(ProtocolError, match="negative response length -2"):
        parse_sasl_initial_response(Message(b"p", b"SCRAM\0\xff\xff\xff\xfe"))
    with pytest.raises(ProtocolError, match="expected SASLResponse"):
        parse_sasl_response(Message(b"Q", b""))


def test_value_validation_in_builders() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        AuthenticationMD5Password(b"abc")
    with pytest.raises(ValueError, match=r"4\.\.256"):
        BackendKeyData(1, b"abc")
    with pytest.raises(ValueError, match="field code"):
        ErrorResponse({"MM": "x"})
    with pytest.raises(ValueError, match="NUL"):
        ParameterStatus("a\0", "b").encode()


def test_negotiate_protocol_version_parses_postgres_15_bytes() -> None:
    """PostgreSQL 15 answering a 3.2 startup: the full version code 3.0, no options."""
    parsed = parse_backend_message(Message(b"v", b"\x00\x03\x00\x00\x00\x00\x00\x00"))
    assert parsed == NegotiateProtocolVersion(0, ())
    assert isinstance(parsed, NegotiateProtocolVersion) and parsed.newest_version == (3, 0)
