"""The backend side of a session: connect, TLS per ``backend_tls``, log in as the provisioned role,
read the session start up to ReadyForQuery."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import ssl
from collections.abc import Mapping

import attrs
import trio

from waypoint.config.model import ListenerConfig
from waypoint.pgwire import (
    BackendError,
    BackendSessionStart,
    BackendStartup,
    DeriveKey,
    LoginError,
    NeedData,
    ProtocolError,
    ScramKeys,
    SendBytes,
    SSLNegotiation,
    UnsupportedCertificate,
    UpstreamLogin,
    tls_server_end_point_hash,
)

RECV_SIZE = 64 * 1024


class BackendUnavailable(Exception):
    """TCP connect or TLS setup to the backend failed (08006 for the client)."""


def backend_ssl_context(listener: ListenerConfig) -> ssl.SSLContext | None:
    """The client-side TLS context for ``backend_tls`` (None for ``disable``)."""
    mode = listener.backend_tls
    if mode == "disable":
        return None
    if mode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=listener.backend_ca_file)
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@attrs.define(eq=False)
class BackendConnection:
    socket_stream: trio.SocketStream
    stream: trio.abc.Stream  # socket_stream, or an SSLStream over it
    tls: bool
    cert_der: bytes | None
    address: tuple[str, int]
    #: The certificate was checked against the CA and the host name (backend_tls = verify-full).
    verified_host: bool = False

    async def aclose(self) -> None:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await self.stream.aclose()


async def start_backend_tls(
    stream: trio.SocketStream,
    backend: tuple[str, int],
    listener: ListenerConfig,
    ssl_context: ssl.SSLContext,
) -> trio.SSLStream[trio.SocketStream] | None:
    """SSLRequest on a new connection to ``backend`` (host, port: from the configuration) (:class:`~waypoint.pgwire.SSLNegotiation`), then
    the TLS handshake: the TLS stream, or None when the backend refused TLS and
    ``backend_tls = prefer`` lets the connection go on in plaintext. Raises
    BackendUnavailable (a refusal, a bad answer, bytes after the answer, a failed handshake).
    The caller bounds the time and closes ``stream`` on error."""
    host, port = backend
    negotiation = SSLNegotiation(allow_plain=listener.backend_tls == "prefer")
    try:
        await stream.send_all(negotiation.request())
        if not negotiation.receive_data(await stream.receive_some(RECV_SIZE)):
            return None
        ssl_stream = trio.SSLStream(
            stream,
            ssl_context,
            server_hostname=host if listener.backend_tls == "verify-full" else None,
            https_compatible=False,
        )
        await ssl_stream.do_handshake()
        return ssl_stream
    except ProtocolError as exc:
        raise BackendUnavailable(
            f"backend {host}:{port}: {exc} (backend_tls = {listener.backend_tls})"
        ) from exc
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise BackendUnavailable(f"TLS to backend {host}:{port} failed: {exc}") from exc


async def connect_backend(
    listener: ListenerConfig, ssl_context: ssl.SSLContext | None
) -> BackendConnection:
    """Open the TCP connection and negotiate TLS per ``backend_tls``. The caller bounds the time."""
    host, port = listener.backend_address
    try:
        sock_stream = await _open_tcp(host, port)
    except OSError as exc:
        raise BackendUnavailable(f"connect to {host}:{port} failed: {exc}") from exc
    conn = BackendConnection(sock_stream, sock_stream, False, None, (host, port))
    if ssl_context is None:
        return conn
    try:
        ssl_stream = await start_backend_tls(sock_stream, (host, port), listener, ssl_context)
    except BaseException:
        await conn.aclose()
        raise
    if ssl_stream is None:
        return conn
    conn.stream = ssl_stream
    conn.tls = True
    conn.cert_der = ssl_stream.getpeercert(binary_form=True)
    conn.verified_host = listener.backend_tls == "verify-full"
    return conn


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``: an IP address is connected to directly (the one address
    there is to try; this runs for every unpooled session), a name through
    ``trio.open_tcp_stream`` (resolution, and each address in turn)."""
    family = _ip_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@functools.lru_cache(maxsize=64)
def _ip_family(host: str) -> socket.AddressFamily | None:
    """``AF_INET`` / ``AF_INET6`` for an IP address, None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


@attrs.frozen
class BackendLogin:
    """Who to log in to the backend as, and the session asked for (``proxy.source``)."""

    role: str
    secret: str = attrs.field(repr=False)
    scram_keys: ScramKeys | None = attrs.field(repr=False)
    database: str
    parameters: Mapping[str, str]
    protocol: tuple[int, int]
    limiter: trio.CapacityLimiter | None = None


def _channel_binding(conn: BackendConnection, login: BackendLogin) -> bytes | None:
    """The ``tls-server-end-point`` hash of the backend's certificate (None without TLS).

    Over TLS, a role with a SCRAM verifier logs in only with SCRAM-SHA-256-PLUS: without
    channel binding, a man in the middle of an unverified TLS link (``backend_tls = prefer``
    or ``require``, or ``verify-ca`` with another certificate of the same CA) could ask for
    the password in cleartext or relay the SCRAM exchange. So a certificate that cannot be
    bound (Ed25519, Ed448, an unknown signature algorithm; PostgreSQL cannot bind them
    either) fails such a login before a byte of it is sent, except under ``verify-full``,
    where the certificate itself proves the server: SCRAM then runs unbound, and still no
    other method is accepted.
    """
    if not conn.tls:
        return None
    try:
        if not conn.cert_der:
            raise UnsupportedCertificate("the backend presented no certificate")
        return tls_server_end_point_hash(conn.cert_der)
    except UnsupportedCertificate as exc:
        if login.scram_keys is None or conn.verified_host:
            return None  # an md5 role (no binding to require), or a verified server
        raise LoginError(
            f"cannot bind the login to the backend's TLS certificate: {exc}; use "
            "backend_tls = verify-full, or give the server an RSA or ECDSA certificate"
        ) from None


async def login_backend(conn: BackendConnection, login: BackendLogin) -> BackendSessionStart:
    """Authenticate as ``login.role`` and read the session start. Raises BackendError (the
    backend's own ErrorResponse, to forward), LoginError / ProtocolError (misbehaving backend)
    or BackendUnavailable (connection lost)."""
    stream = conn.stream
    cb = _channel_binding(conn, login)
    scram_role = conn.tls and login.scram_keys is not None
    upstream = UpstreamLogin(
        login.role,
        login.secret,
        scram_keys=login.scram_keys,
        tls_server_end_point=cb,
        channel_binding_required=scram_role and cb is not None,
        scram_required=scram_role,
    )
    parameters = {"user": login.role, "database": login.database}
    for k, v in login.parameters.items():
        if k not in ("user", "database"):
            parameters[k] = v
    startup = BackendStartup(upstream, parameters, login.protocol)
    try:
        while True:
            event = startup.next_event()
            if isinstance(event, SendBytes):
                await stream.send_all(event.data)
            elif isinstance(event, NeedData):
                data = await stream.receive_some(RECV_SIZE)
                if not data:
                    raise BackendUnavailable(
                        "backend closed the connection "
                        + ("before ReadyForQuery" if startup.authenticated else "during login")
                    )
                startup.receive_data(data)
            elif isinstance(event, DeriveKey):
                await trio.to_thread.run_sync(startup.derive_key, limiter=login.limiter)
            else:
                return event.start
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise BackendUnavailable(f"backend connection lost during login: {exc}") from exc


__all__ = [
    "BackendConnection",
    "BackendError",
    "BackendLogin",
    "BackendSessionStart",
    "BackendUnavailable",
    "LoginError",
    "backend_ssl_context",
    "connect_backend",
    "login_backend",
    "start_backend_tls",
]
