"""The client side of a session's handshake: the client connection, the first packets up to
the StartupMessage (SSLRequest, GSSENCRequest, direct TLS, CancelRequest), Waypoint's own TLS
from the first byte, and the three ways a handshake ends early (:class:`Refused`,
:class:`ForwardBackendError`, :class:`Close`)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from waypoint import errors
from waypoint.errors import Refusal
from waypoint.pgwire import (
    CancelRequest,
    DirectTLS,
    FirstPacketReader,
    GSSENCRequest,
    ProtocolError,
    SSLRequest,
    StartupMessage,
)
from waypoint.proxy.cancel import serve_cancel_request
from waypoint.proxy.streams import ServerTLSStream
from waypoint.proxy.tls import (
    ALPN_POSTGRESQL,
    ClientHelloError,
    ClientHelloScanner,
    parse_client_hello,
)

if TYPE_CHECKING:
    from waypoint.proxy.context import ListenerContext

RECV_SIZE = 16 * 1024
# How many SSLRequest / GSSENCRequest rounds a client may make before its startup packet.
MAX_NEGOTIATION_ROUNDS = 4


class Refused(Exception):
    """Ends the handshake with a FATAL to the client (already TLS-negotiated, if any)."""

    def __init__(self, refusal: Refusal, *, cache: bool = True) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
        self.cache = cache


class ForwardBackendError(Exception):
    """Ends the handshake by forwarding the backend's own ErrorResponse verbatim."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.fields = dict(fields)


class Close(Exception):
    """Ends the connection without a message (TLS failures, cancel requests, garbage)."""


_CLOSE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


@attrs.define(eq=False)
class ClientConnection:
    """The client's side of a session: the accepted socket, and the stream over it (the
    socket itself, or Waypoint's TLS stream once TLS is negotiated)."""

    raw: trio.SocketStream
    stream: trio.abc.Stream
    peer: tuple[str, int]
    tls: bool = False
    tls_version: str | None = None

    async def send(self, data: bytes) -> None:
        """Send to the client; a client that went away (reset, closed, TLS broken) is a
        :class:`Close`, as when reading, never an error of Waypoint's."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            raise Close(f"client connection broke: {exc}") from exc

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            raise Close(f"client connection broke: {exc}") from exc
        if not data:
            raise Close("client closed the connection")
        return bytes(data)

    async def send_quietly(self, data: bytes) -> None:
        """Send a last word (a FATAL), bounded, whatever state the connection is in."""
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1),
            contextlib.suppress(Close, *_CLOSE_ERRORS),
        ):
            await self.send(data)

    async def close(self) -> None:
        """Close the client's connection, bounded; never raises (except Cancelled)."""
        with trio.move_on_after(1), contextlib.suppress(*_CLOSE_ERRORS):
            await self.stream.aclose()


def peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(addr[1])


async def negotiate(
    ctx: ListenerContext, client: ClientConnection
) -> tuple[StartupMessage | None, bytes]:
    """SSLRequest / GSSENCRequest / direct TLS / CancelRequest loop up to the StartupMessage.

    Returns (startup, bytes the client sent after it), or (None, b"") when the connection
    was a cancel request."""
    reader = FirstPacketReader()
    rounds = 0
    while True:
        try:
            event = reader.next_event()
        except ProtocolError as exc:
            raise Refused(Refusal(exc.sqlstate, str(exc)), cache=False) from exc
        if event is None:
            reader.feed(await client.receive())
            continue
        rounds += 1
        if rounds > MAX_NEGOTIATION_ROUNDS:
            raise Refused(errors.protocol_violation("too many negotiation requests"), cache=False)
        if isinstance(event, StartupMessage):
            return event, reader.take_buffered()
        if isinstance(event, CancelRequest):
            await serve_cancel_request(
                event,
                client.peer,
                admission=ctx.admission,
                identity=ctx.identity,
                state=ctx.state,
                listener=ctx.listener,
                ssl_context=ctx.backend_ssl,
            )
            return None, b""
        if isinstance(event, GSSENCRequest):
            await client.send(b"N")
            continue
        if isinstance(event, SSLRequest):
            if client.tls:
                raise Refused(errors.protocol_violation("SSLRequest inside TLS"), cache=False)
            if reader.buffered:
                # Bytes sent before our answer travelled in plaintext (CVE-2021-23214).
                raise Close("client sent data after SSLRequest before the answer")
            if not ctx.tls.enabled:
                await client.send(b"N")
                continue
            await client.send(b"S")
            hello = await _read_client_hello(client, b"")
            await _start_tls(ctx, client, hello, direct=False)
            reader = FirstPacketReader()
            continue
        if isinstance(event, DirectTLS):
            if client.tls or not ctx.tls.enabled:
                raise Close("direct TLS on a listener without TLS")
            hello = await _read_client_hello(client, event.data)
            await _start_tls(ctx, client, hello, direct=True)
            reader = FirstPacketReader()
            continue
        raise Close(f"unexpected first packet {type(event).__name__}")  # pragma: no cover


async def _read_client_hello(client: ClientConnection, have: bytes) -> bytes:
    scanner = ClientHelloScanner()
    data = have
    while True:
        try:
            n = scanner.feed(data)
        except ClientHelloError as exc:
            raise Close(f"bad TLS ClientHello: {exc}") from exc
        if n is not None:
            return bytes(scanner.buffer)
        data = await client.receive()


async def _start_tls(
    ctx: ListenerContext, client: ClientConnection, hello: bytes, *, direct: bool
) -> None:
    try:
        info = parse_client_hello(hello)
    except ClientHelloError as exc:
        raise Close(f"bad TLS ClientHello: {exc}") from exc
    if direct and ALPN_POSTGRESQL not in info.alpn:
        # PostgreSQL 17 refuses direct TLS without ALPN "postgresql" (protects against
        # cross-protocol attacks); so do we.
        raise Close("direct TLS without ALPN postgresql")
    context = await ctx.tls.context_for(info.server_name)
    if context is None:
        raise Close(f"no certificate for server name {info.server_name!r}")
    # Waypoint's own SSLObject and memory BIOs from the first byte: the peeked ClientHello is
    # its first input, and the relay later takes this very TLS state over (``handover``).
    tls_stream = ServerTLSStream(client.raw, context, hello)
    try:
        await tls_stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
        raise Close(f"TLS handshake failed: {exc}") from exc
    if direct and tls_stream.selected_alpn_protocol() != ALPN_POSTGRESQL:
        raise Close("direct TLS: ALPN postgresql was not negotiated")
    client.stream = tls_stream
    client.tls = True
    client.tls_version = tls_stream.version()
