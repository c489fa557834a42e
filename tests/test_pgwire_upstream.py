"""The backend connection's start, sans-IO (``pgwire.upstream``), driven by byte lists: the
SSLRequest answer and the login up to ReadyForQuery, a hostile backend at each step (a 1 GiB
length word, bytes after the SSLRequest answer, a message that does not belong, a second
AuthenticationOk), and the error state after a failure."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable

import pytest
from scramp import ScramMechanism

from waypoint.pgwire import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendError,
    BackendKeyData,
    LoginError,
    MessageReader,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    ProtocolError,
    ReadyForQuery,
    StartupMessage,
    UpstreamLogin,
    build_error_response,
    build_ssl_request,
    make_scram_verifier,
    parse_first_packet,
    parse_password_message,
    parse_sasl_initial_response,
    parse_sasl_response,
)
from waypoint.pgwire.upstream import (
    STARTUP_MAX_MESSAGE_SIZE,
    BackendSessionStart,
    BackendStartup,
    DeriveKey,
    NeedData,
    SendBytes,
    SSLNegotiation,
    Started,
)

USER = "wp_pg_main_alice"
PASSWORD = "correct horse battery staple"
PARAMS = {"user": USER, "database": "app", "application_name": "psql"}
#: A length word just under PostgreSQL's own 1 GiB message ceiling.
NEAR_1_GIB = 0x3FFF0000
KEY = BackendKeyData(4242, b"\x01\x02\x03\x04")
SESSION = (
    ParameterStatus("server_version", "18.1").encode()
    + ParameterStatus("client_encoding", "UTF8").encode()
    + KEY.encode()
    + NoticeResponse({"S": "NOTICE", "C": "00000", "M": "hello"}).encode()
    + ReadyForQuery(b"I").encode()
)


def _drive(startup: BackendStartup, chunks: Iterable[bytes]) -> tuple[list[bytes], Started]:
    """Run ``startup`` over ``chunks`` (what the backend sends, in reads); what it sent."""
    sent: list[bytes] = []
    pending = iter(chunks)
    while True:
        event = startup.next_event()
        if isinstance(event, SendBytes):
            sent.append(event.data)
        elif isinstance(event, NeedData):
            startup.receive_data(next(pending))
        elif isinstance(event, DeriveKey):
            startup.derive_key()
        else:
            return sent, event


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _password_of(data: bytes) -> str:
    reader = MessageReader()
    reader.feed(data)
    msg = reader.next_message()
    assert msg is not None
    return parse_password_message(msg).password


# ----------------------------------------------------------------------------- SSLRequest


def test_ssl_answer_s_starts_tls() -> None:
    negotiation = SSLNegotiation(allow_plain=False)
    assert negotiation.request() == build_ssl_request()
    assert negotiation.receive_data(b"S") is True


def test_ssl_answer_n_goes_on_in_plaintext_only_when_allowed() -> None:
    assert SSLNegotiation(allow_plain=True).receive_data(b"N") is False
    with pytest.raises(ProtocolError, match="refused TLS"):
        SSLNegotiation(allow_plain=False).receive_data(b"N")


@pytest.mark.parametrize("answer", [b"S", b"N"])
def test_bytes_after_the_ssl_answer_are_refused(answer: bytes) -> None:
    """A man in the middle that answers and then injects plaintext (a fake AuthenticationOk
    and ReadyForQuery, or bytes the TLS layer would be handed as if they were the server's)
    gets a protocol error, not a session."""
    injected = AuthenticationOk().encode() + ReadyForQuery(b"I").encode()
    negotiation = SSLNegotiation(allow_plain=True)
    with pytest.raises(ProtocolError, match=r"bytes after its answer .* to SSLRequest"):
        negotiation.receive_data(answer + injected)
    with pytest.raises(LoginError, match="failed earlier"):
        negotiation.receive_data(b"S")


@pytest.mark.parametrize(("data", "match"), [(b"E", "answered SSLRequest with"), (b"", "closed")])
def test_other_ssl_answers_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        SSLNegotiation(allow_plain=True).receive_data(data)


def test_ssl_answer_is_read_once() -> None:
    negotiation = SSLNegotiation(allow_plain=True)
    negotiation.receive_data(b"N")
    with pytest.raises(ProtocolError, match="answered already"):
        negotiation.receive_data(b"N")


# ---------------------------------------------------------------------------------- login


def test_trust_login_reads_the_session_start_to_ready_for_query() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS, (3, 2))
    leftover = b"A\x00\x00\x00\x05x"
    sent, started = _drive(startup, [AuthenticationOk().encode() + SESSION + leftover])
    first = parse_first_packet(sent[0])
    assert isinstance(first, StartupMessage)
    assert first.protocol == (3, 2) and dict(first.parameters) == PARAMS
    assert len(sent) == 1
    start = started.start
    assert isinstance(start, BackendSessionStart)
    assert start.raw == SESSION
    assert start.key == KEY
    assert start.parameters == {"server_version": "18.1", "client_encoding": "UTF8"}
    assert start.leftover == leftover
    assert start.method == "trust" and start.status == b"I"
    assert startup.next_event() == started  # asked again: the same answer


def test_a_login_fed_one_byte_at_a_time_ends_the_same() -> None:
    backend = AuthenticationCleartextPassword().encode() + AuthenticationOk().encode() + SESSION
    _sent, whole = _drive(BackendStartup(UpstreamLogin(USER, PASSWORD), PARAMS), [backend])
    startup = BackendStartup(UpstreamLogin(USER, PASSWORD), PARAMS)
    sent, bytewise = _drive(startup, _bytewise(backend))
    assert _password_of(sent[1]) == PASSWORD
    assert bytewise.start.raw == whole.start.raw == SESSION
    assert bytewise.start.key == whole.start.key == KEY


def test_notices_during_login_come_first_in_the_session_start() -> None:
    notice = NoticeResponse({"S": "WARNING", "C": "01000", "M": "password expires"}).encode()
    _sent, started = _drive(
        BackendStartup(UpstreamLogin(USER), PARAMS),
        [notice + AuthenticationOk().encode() + SESSION],
    )
    assert started.start.raw == notice + SESSION


def test_scram_with_a_password_asks_for_the_key_derivation() -> None:
    """PBKDF2 is the caller's to run (a worker thread): the machine says when."""
    verifier, _keys = make_scram_verifier(PASSWORD)
    _mech, rest = verifier.split("$", 1)
    iter_salt, stored_server = rest.split("$")
    iterations, salt = iter_salt.split(":")
    stored, server_key = stored_server.split(":")
    auth_info = (
        base64.b64decode(salt),
        base64.b64decode(stored),
        base64.b64decode(server_key),
        int(iterations),
    )
    server = ScramMechanism("SCRAM-SHA-256").make_server(lambda _u: auth_info)
    startup = BackendStartup(UpstreamLogin(USER, PASSWORD), PARAMS)
    assert isinstance(startup.next_event(), SendBytes)  # the StartupMessage
    assert startup.next_event() == NeedData()
    startup.receive_data(AuthenticationSASL(("SCRAM-SHA-256",)).encode())
    initial = startup.next_event()
    assert isinstance(initial, SendBytes)
    reader = MessageReader()
    reader.feed(initial.data)
    msg = reader.next_message()
    assert msg is not None
    client_first = parse_sasl_initial_response(msg).data
    assert client_first is not None
    server.set_client_first(client_first.decode())
    assert startup.next_event() == NeedData()
    startup.receive_data(AuthenticationSASLContinue(server.get_server_first().encode()).encode())
    assert startup.next_event() == DeriveKey()
    assert startup.next_event() == DeriveKey()  # until it is done
    startup.derive_key()
    final = startup.next_event()
    assert isinstance(final, SendBytes)
    reader.feed(final.data)
    msg = reader.next_message()
    assert msg is not None
    server.set_client_final(parse_sasl_response(msg).data.decode())
    assert startup.next_event() == NeedData()
    startup.receive_data(
        AuthenticationSASLFinal(server.get_server_final().encode()).encode()
        + AuthenticationOk().encode()
        + SESSION
    )
    started = startup.next_event()
    assert isinstance(started, Started)
    assert started.start.method == "SCRAM-SHA-256"


def test_negotiate_protocol_version_is_kept_for_the_client() -> None:
    npv = NegotiateProtocolVersion(0, ("_pq_.x",))
    _sent, started = _drive(
        BackendStartup(UpstreamLogin(USER), PARAMS, (3, 2)),
        [npv.encode() + AuthenticationOk().encode() + SESSION],
    )
    assert started.start.negotiate == npv
    assert started.start.raw == SESSION


# ------------------------------------------------------------------------- hostile backends


def test_a_1_gib_length_word_during_login_is_refused_at_once() -> None:
    """The length word is checked as soon as the header is in: nothing of the body is
    awaited or buffered (the old reader took messages up to ~1 GiB during login)."""
    startup = BackendStartup(UpstreamLogin(USER, PASSWORD), PARAMS)
    with pytest.raises(
        ProtocolError, match=rf"backend login: .*above the limit of {STARTUP_MAX_MESSAGE_SIZE}"
    ):
        _drive(startup, [b"R" + struct.pack("!I", NEAR_1_GIB)])


def test_an_oversized_parameter_status_is_refused() -> None:
    big = ParameterStatus("search_path", "x" * STARTUP_MAX_MESSAGE_SIZE).encode()
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    with pytest.raises(ProtocolError, match="above the limit"):
        _drive(startup, [AuthenticationOk().encode(), big])


def test_a_flood_of_small_notices_is_bounded() -> None:
    notice = NoticeResponse({"S": "NOTICE", "C": "00000", "M": "x" * 1000}).encode()
    startup = BackendStartup(UpstreamLogin(USER), PARAMS, max_total=64 * 1024)
    with pytest.raises(ProtocolError, match="more than 65536 bytes before ReadyForQuery"):
        _drive(startup, [AuthenticationOk().encode()] + [notice] * 100)


def test_a_session_message_mid_authentication_is_refused() -> None:
    data_row = b"D" + struct.pack("!IH", 6, 0)
    startup = BackendStartup(UpstreamLogin(USER, PASSWORD), PARAMS)
    with pytest.raises(ProtocolError, match="unexpected backend message type b'D'"):
        _drive(startup, [AuthenticationCleartextPassword().encode() + data_row])


def test_a_second_authentication_ok_is_refused() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    with pytest.raises(LoginError, match="AuthenticationOk after AuthenticationOk"):
        _drive(startup, [AuthenticationOk().encode() * 2 + SESSION])


def test_a_password_request_after_the_login_gets_no_password() -> None:
    """After AuthenticationOk, an authentication request is refused, not forwarded to the
    client (which might answer it with a password of its own)."""
    startup = BackendStartup(UpstreamLogin(USER, PASSWORD), PARAMS)
    with pytest.raises(LoginError, match="AuthenticationCleartextPassword after"):
        _drive(startup, [AuthenticationOk().encode() + AuthenticationCleartextPassword().encode()])


def test_backend_key_data_twice_is_refused() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    with pytest.raises(LoginError, match="BackendKeyData twice"):
        _drive(startup, [AuthenticationOk().encode() + KEY.encode() + KEY.encode()])


def test_negotiate_protocol_version_after_the_login_is_refused() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS, (3, 2))
    with pytest.raises(LoginError, match="NegotiateProtocolVersion after AuthenticationOk"):
        _drive(startup, [AuthenticationOk().encode() + NegotiateProtocolVersion(0, ()).encode()])


def test_the_backend_error_is_raised_with_its_fields() -> None:
    error = build_error_response("FATAL", "28P01", "password authentication failed")
    startup = BackendStartup(UpstreamLogin(USER, PASSWORD), PARAMS)
    with pytest.raises(BackendError) as caught:
        _drive(startup, [AuthenticationCleartextPassword().encode(), error])
    assert caught.value.sqlstate == "28P01"


def test_a_hang_up_is_named_by_phase() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    with pytest.raises(LoginError, match="during login"):
        _drive(startup, [b""])
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    with pytest.raises(LoginError, match="before ReadyForQuery"):
        _drive(startup, [AuthenticationOk().encode(), b""])


def test_after_a_failure_every_call_raises() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    with pytest.raises(LoginError, match="AuthenticationOk after"):
        _drive(startup, [AuthenticationOk().encode() * 2])
    for call in (
        startup.next_event,
        lambda: startup.receive_data(SESSION),
        startup.derive_key,
    ):
        with pytest.raises(LoginError, match=r"failed earlier: .*AuthenticationOk after"):
            call()


def test_derive_key_out_of_turn_is_an_error() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    with pytest.raises(LoginError, match="no key is to be derived"):
        startup.derive_key()
    with pytest.raises(LoginError, match="failed earlier"):
        startup.next_event()


def test_data_after_the_start_is_the_relays() -> None:
    startup = BackendStartup(UpstreamLogin(USER), PARAMS)
    _drive(startup, [AuthenticationOk().encode() + SESSION])
    with pytest.raises(LoginError, match="start is over"):
        startup.receive_data(b"more")
