"""Upstream login (waypoint.pgwire.login.UpstreamLogin) against real PostgreSQL 15 and 18.

Each test drives the sans-IO backend start (``pgwire.upstream``: SSLNegotiation, then
BackendStartup running the login) over a plain blocking socket with :func:`open_session`,
then proves the session is usable with a simple Query.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import socket
import ssl
import struct
from collections.abc import Iterator

import attrs
import pg8000.native
import pytest
from pgcluster import HbaMethod, PgCluster

from waypoint.pgwire.errors import BackendError
from waypoint.pgwire.framing import Message, MessageReader, build_message
from waypoint.pgwire.login import (
    ScramKeys,
    UpstreamLogin,
    make_scram_verifier,
    tls_server_end_point_hash,
)
from waypoint.pgwire.messages import (
    BackendKeyData,
    ErrorResponse,
    parse_backend_message,
)
from waypoint.pgwire.upstream import (
    BackendStartup,
    DeriveKey,
    NeedData,
    SendBytes,
    SSLNegotiation,
)

IO_TIMEOUT = 15.0
_user_numbers = itertools.count(1)


@attrs.define
class Session:
    """A logged-in backend connection: the socket, its reader and what the startup said."""

    sock: socket.socket
    reader: MessageReader
    login: UpstreamLogin
    parameters: dict[str, str]
    key: BackendKeyData | None

    def next_message(self) -> Message:
        while (msg := self.reader.next_message()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the backend closed the connection")
            self.reader.feed(data)
        return msg

    def query(self, sql: str) -> list[list[str | None]]:
        """Run one simple Query; return its text rows. An ErrorResponse raises BackendError."""
        self.sock.sendall(build_message(b"Q", sql.encode() + b"\0"))
        rows: list[list[str | None]] = []
        error: BackendError | None = None
        while True:
            msg = self.next_message()
            if msg.type == b"D":
                rows.append(_parse_data_row(msg.body))
            elif msg.type == b"E":
                parsed = parse_backend_message(msg)
                assert isinstance(parsed, ErrorResponse)
                error = BackendError(parsed.fields)
            elif msg.type == b"Z":
                if error is not None:
                    raise error
                return rows


def _parse_data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!h", body, 0)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        values.append(body[pos : pos + length].decode())
        pos += length
    return values


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    """Collects the sessions a test opens and closes them (Terminate, then the socket)."""
    opened: list[Session] = []
    yield opened
    for session in opened:
        with contextlib.suppress(OSError):
            session.sock.sendall(build_message(b"X"))
        session.sock.close()


def open_session(
    cluster: PgCluster,
    user: str,
    password: str | None = None,
    *,
    scram_keys: ScramKeys | None = None,
    tls: ssl.SSLContext | None = None,
    protocol: tuple[int, int] = (3, 0),
    dbname: str = "postgres",
    opened: list[Session] | None = None,
) -> Session:
    """Connect over TCP (TLS after SSLRequest when ``tls``), log in with UpstreamLogin and read
    the session start up to ReadyForQuery."""
    sock = socket.create_connection((cluster.host, cluster.port), timeout=IO_TIMEOUT)
    cb_hash: bytes | None = None
    try:
        if tls is not None:
            negotiation = SSLNegotiation(allow_plain=False)
            sock.sendall(negotiation.request())
            assert negotiation.receive_data(sock.recv(65536))
            sock = tls.wrap_socket(sock, server_hostname=cluster.host)
            cert = sock.getpeercert(binary_form=True)
            assert cert is not None
            cb_hash = tls_server_end_point_hash(cert)
        login = UpstreamLogin(user, password, scram_keys=scram_keys, tls_server_end_point=cb_hash)
        startup = BackendStartup(login, {"user": user, "database": dbname}, protocol)
        while True:
            event = startup.next_event()
            if isinstance(event, SendBytes):
                sock.sendall(event.data)
            elif isinstance(event, NeedData):
                startup.receive_data(sock.recv(65536))
            elif isinstance(event, DeriveKey):
                startup.derive_key()
            else:
                break
        start = event.start
        session = Session(
            sock=sock,
            reader=MessageReader(),
            login=login,
            parameters=start.parameters,
            key=start.key,
        )
        session.reader.feed(start.leftover)
    except BaseException:
        sock.close()
        raise
    if opened is not None:
        opened.append(session)
    return session


def _new_user(cluster: PgCluster, method: HbaMethod) -> tuple[str, str]:
    name = f"login_{method.replace('-', '_')}_{next(_user_numbers)}"
    password = f"pw-{name}-secret"
    cluster.add_user(name, None if method == "trust" else password, method)
    return name, password


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("scram-sha-256", "SCRAM-SHA-256"),
        ("md5", "md5"),
        ("password", "password"),
        ("trust", "trust"),
    ],
)
def test_login_with_each_method_reaches_ready_for_query(
    pg: PgCluster, sessions: list[Session], method: HbaMethod, expected: str
) -> None:
    user, password = _new_user(pg, method)
    session = open_session(pg, user, password, opened=sessions)
    assert session.login.method == expected
    assert session.query("SELECT current_user") == [[user]]
    assert session.parameters["server_version"].startswith(str(pg.version))
    assert session.key is not None


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
def test_wrong_password_is_refused_with_28p01(
    pg: PgCluster, sessions: list[Session], method: HbaMethod
) -> None:
    user, _ = _new_user(pg, method)
    with pytest.raises(BackendError) as info:
        open_session(pg, user, "not-the-password", opened=sessions)
    assert info.value.sqlstate == "28P01"
    assert info.value.fields["S"] == "FATAL"
    assert sessions == []


def test_scram_plus_is_used_over_tls(pg15_ssl: PgCluster, sessions: list[Session]) -> None:
    user, password = _new_user(pg15_ssl, "scram-sha-256")
    assert pg15_ssl.ca_pem_path is not None
    context = ssl.create_default_context(cafile=str(pg15_ssl.ca_pem_path))
    session = open_session(pg15_ssl, user, password, tls=context, opened=sessions)
    assert session.login.method == "SCRAM-SHA-256-PLUS"
    assert session.query(
        "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    ) == [[user, "t"]]


def test_scram_without_tls_uses_plain_scram_on_an_ssl_server(
    pg15_ssl: PgCluster, sessions: list[Session]
) -> None:
    user, password = _new_user(pg15_ssl, "scram-sha-256")
    session = open_session(pg15_ssl, user, password, opened=sessions)
    assert session.login.method == "SCRAM-SHA-256"


def _role_with_verifier(cluster: PgCluster) -> tuple[str, ScramKeys]:
    """A role as Waypoint provisions it: no hba line of its own, a verifier made here."""
    name = f"login_keys_{next(_user_numbers)}"
    verifier, keys = make_scram_verifier(f"secret-{name}")
    cluster.execute(
        f"CREATE ROLE {pg8000.native.identifier(name)} LOGIN "
        f"PASSWORD {pg8000.native.literal(verifier)}"
    )
    return name, keys


def test_precomputed_scram_keys_log_in_without_the_password(
    pg: PgCluster, sessions: list[Session]
) -> None:
    user, keys = _role_with_verifier(pg)
    session = open_session(pg, user, None, scram_keys=keys, opened=sessions)
    assert session.login.used_precomputed_keys
    assert session.login.method == "SCRAM-SHA-256"
    assert session.query("SELECT current_user") == [[user]]


def test_precomputed_scram_keys_work_with_channel_binding(
    pg15_ssl: PgCluster, sessions: list[Session]
) -> None:
    user, keys = _role_with_verifier(pg15_ssl)
    assert pg15_ssl.ca_pem_path is not None
    context = ssl.create_default_context(cafile=str(pg15_ssl.ca_pem_path))
    session = open_session(pg15_ssl, user, None, scram_keys=keys, tls=context, opened=sessions)
    assert session.login.used_precomputed_keys
    assert session.login.method == "SCRAM-SHA-256-PLUS"


def test_precomputed_keys_of_another_verifier_are_refused(
    pg: PgCluster, sessions: list[Session]
) -> None:
    user, _ = _role_with_verifier(pg)
    other_salt = make_scram_verifier("other")[1].salt
    _, wrong_keys = make_scram_verifier("not-the-secret", salt=other_salt)
    # Different salt from the server's: without a password the login cannot go on.
    with pytest.raises(Exception, match="salt or iteration count differs"):
        open_session(pg, user, None, scram_keys=wrong_keys, opened=sessions)
    # Same salt and iterations but another secret: the server refuses the proof.
    server_keys = _server_salt_and_iterations(pg, user)
    _, forged = make_scram_verifier(
        "not-the-secret", salt=server_keys[0], iterations=server_keys[1]
    )
    with pytest.raises(BackendError) as info:
        open_session(pg, user, None, scram_keys=forged, opened=sessions)
    assert info.value.sqlstate == "28P01"


def _server_salt_and_iterations(cluster: PgCluster, user: str) -> tuple[bytes, int]:
    stored = cluster.execute(
        "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = :n", n=user
    )[0][0]
    head = stored.split("$")[1]
    iterations, salt_b64 = head.split(":")
    return base64.b64decode(salt_b64), int(iterations)


def test_protocol_3_2_gives_a_32_byte_cancel_key_on_18(
    pg18: PgCluster, sessions: list[Session]
) -> None:
    user, password = _new_user(pg18, "scram-sha-256")
    session = open_session(pg18, user, password, protocol=(3, 2), opened=sessions)
    assert session.login.negotiate is None
    assert session.key is not None
    assert len(session.key.secret) == 32
    assert session.query("SELECT 1") == [["1"]]


def test_protocol_3_2_is_negotiated_down_on_15(pg15: PgCluster, sessions: list[Session]) -> None:
    user, password = _new_user(pg15, "scram-sha-256")
    session = open_session(pg15, user, password, protocol=(3, 2), opened=sessions)
    assert session.login.negotiate is not None
    assert session.login.negotiate.newest_minor == 0
    assert session.key is not None
    assert len(session.key.secret) == 4
    assert session.query("SELECT current_user") == [[user]]
