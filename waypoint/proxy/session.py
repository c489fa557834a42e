"""One client connection, start to end (docs/protocol.md): first packet, TLS, identity, grant, slot,
provisioning, backend login, relay, and the one log line when it ends.

Every step before the relay runs inside one cancel scope bounded by ``handshake_timeout``.
A failure here ends this connection only: the task catches its own errors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import ssl
from collections.abc import Callable, Mapping

import attrs
import trio

from waypoint import errors
from waypoint.audit.service import AuditService
from waypoint.audit.session import SessionAudit
from waypoint.config.model import Config, ListenerConfig
from waypoint.config.units import format_duration
from waypoint.console.hub import Caller, ConsoleHub
from waypoint.console.server import serve_console
from waypoint.errors import Refusal
from waypoint.grants.evaluate import console_access, evaluate
from waypoint.grants.model import EffectiveGrant
from waypoint.grants.presets import PresetCapResult, parse_preset_cap
from waypoint.identity.model import Identity, IdentityError, IdentityProvider
from waypoint.observability.log import EventLogger, get_logger
from waypoint.observability.metrics import Metrics
from waypoint.pgwire import (
    AuthenticationOk,
    BackendError,
    CancelRequest,
    DirectTLS,
    ErrorResponse,
    FirstPacketReader,
    GSSENCRequest,
    LoginError,
    NegotiateProtocolVersion,
    ProtocolError,
    SSLRequest,
    StartupMessage,
    build_error_response,
)
from waypoint.provision.backends import terminate_pid
from waypoint.provision.engine import Credentials, DatabaseMissing, Provisioner, ProvisionError
from waypoint.proxy.admission import Admission
from waypoint.proxy.backend import (
    BackendConnection,
    BackendLogin,
    BackendPrefetch,
    BackendSessionStart,
    BackendUnavailable,
    connect_backend,
    login_backend,
)
from waypoint.proxy.backend_end import BackendEnd, stop_backend
from waypoint.proxy.cancel import send_cancel, serve_cancel_request
from waypoint.proxy.registry import (
    LiveSession,
    LoginGuess,
    RefusalCache,
    SessionRegistry,
    WarmPeers,
    fatal_bytes,
    new_conn_id,
)
from waypoint.proxy.relay import (
    RelayEngine,
    RelayResult,
    StreamRelay,
    TlsHandover,
)
from waypoint.proxy.streams import ServerTLSStream
from waypoint.proxy.tls import (
    ALPN_POSTGRESQL,
    ClientHelloError,
    ClientTLS,
    client_hello_length,
    parse_client_hello,
)
from waypoint.state.base import CancelTarget, SlotLease, SlotRequest, StateStore

RECV_SIZE = 16 * 1024
# Newest protocol minor version Waypoint speaks (3.2: variable-length cancel keys).
MAX_MINOR = 2
# How many SSLRequest / GSSENCRequest rounds a client may make before its startup packet.
MAX_NEGOTIATION_ROUNDS = 4
# Cancel keys live this long in shared state at most (a session ends sooner, and unregisters).
CANCEL_KEY_TTL = 7 * 24 * 3600.0


@attrs.define(eq=False)
class ListenerContext:
    """Everything a connection task of one listener needs, owned by the app's nursery."""

    config: Config
    listener: ListenerConfig
    identity: IdentityProvider
    provisioner: Provisioner
    state: StateStore
    engine: RelayEngine | None
    tls: ClientTLS
    backend_ssl: ssl.SSLContext | None
    registry: SessionRegistry
    refusals: RefusalCache
    metrics: Metrics
    pbkdf2_limiter: trio.CapacityLimiter
    accepting: bool = True
    #: Peers that logged in recently: their backend connection opens during the whois.
    warm_peers: WarmPeers = attrs.field(factory=WarmPeers)
    #: The app's pre-authentication bounds (handshakes per address, cancel rate).
    admission: Admission = attrs.field(kw_only=True)
    #: The console (its database, SHOW SESSIONS, KILL, LOCK); None: no console database.
    console: ConsoleHub | None = attrs.field(default=None, kw_only=True)
    #: The statement audit (None: ``[audit]`` is off, and no relay carries a hook).
    audit: AuditService | None = attrs.field(default=None, kw_only=True)

    @property
    def allow_raw_sql(self) -> bool:
        return self.config.allow_raw_sql(self.listener)


class _Refused(Exception):
    """Ends the handshake with a FATAL to the client (already TLS-negotiated, if any)."""

    def __init__(self, refusal: Refusal, *, cache: bool = True) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
        self.cache = cache


class _ForwardBackendError(Exception):
    """Ends the handshake by forwarding the backend's own ErrorResponse verbatim."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.fields = dict(fields)


class _Close(Exception):
    """Ends the connection without a message (TLS failures, cancel requests, garbage)."""


@attrs.define(eq=False)
class _Client:
    raw: trio.SocketStream
    stream: trio.abc.Stream
    peer: tuple[str, int]
    tls: bool = False
    tls_version: str | None = None

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            raise _Close(f"client connection broke: {exc}") from exc
        if not data:
            raise _Close("client closed the connection")
        return bytes(data)


@attrs.define(eq=False)
class _Outcome:
    """What the connection log line reports."""

    outcome: str = "closed"
    sqlstate: str | None = None
    detail: str | None = None
    identity: Identity | None = None
    database: str | None = None
    role: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    relay_reason: str | None = None
    backend_end: BackendEnd | None = None
    backend_end_ms: float | None = None


def _peer_of(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(addr[1])


async def serve_connection(
    ctx: ListenerContext,
    raw: trio.SocketStream,
    handshake_done: Callable[[], None] | None = None,
) -> None:
    """The connection task. Never raises (except Cancelled): one bad client affects nobody.
    ``handshake_done`` is called once the handshake is over (before the relay starts)."""
    conn_id = new_conn_id()
    peer = _peer_of(raw)
    client = _Client(raw, raw, peer)
    log = get_logger(
        "session", conn_id=conn_id, listener=ctx.listener.name, peer=f"{peer[0]}:{peer[1]}"
    )
    out = _Outcome()
    started = trio.current_time()
    ctx.metrics.connection_opened(ctx.listener.name)
    try:
        await _run(ctx, client, conn_id, log, out, handshake_done)
    except _Close as exc:
        out.outcome = "closed"
        out.detail = str(exc)
    except Exception as exc:  # a bug: log it, end this connection only
        out.outcome = "error"
        out.detail = f"{type(exc).__name__}: {exc}"
        log.error("session_internal_error", exc_info=True, error=out.detail)
    finally:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1),
            contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError
            ),
        ):
            await client.stream.aclose()
        duration = trio.current_time() - started
        ctx.metrics.connection_closed(
            ctx.listener.name, out.outcome, out.sqlstate, out.bytes_in, out.bytes_out
        )
        ident = out.identity
        log.info(
            "connection_end",
            outcome=out.outcome,
            sqlstate=out.sqlstate,
            login=ident.login if ident else None,
            node=ident.node if ident else None,
            db=out.database,
            role=out.role,
            tls=client.tls,
            relay_end=out.relay_reason,
            backend_end=out.backend_end.how if out.backend_end else None,
            backend_end_detail=out.backend_end.detail if out.backend_end else None,
            backend_end_ms=out.backend_end_ms,
            bytes_in=out.bytes_in,
            bytes_out=out.bytes_out,
            duration_ms=round(duration * 1000, 1),
            detail=out.detail,
        )


async def _run(
    ctx: ListenerContext,
    client: _Client,
    conn_id: str,
    log: EventLogger,
    out: _Outcome,
    handshake_done: Callable[[], None] | None = None,
) -> None:
    startup: StartupMessage | None = None
    console: Caller | None = None
    established: tuple[BackendConnection, BackendSessionStart, SlotLease, LiveSession] | None
    established = None
    handshake_started = trio.current_time()
    with trio.move_on_after(ctx.config.handshake_timeout) as handshake_scope:
        try:
            startup, pending = await _negotiate(ctx, client)
            if startup is None:
                return
            if _asks_for_console(ctx, startup):
                console = await _authorize_console(ctx, client, conn_id, out)
            else:
                established = await _authorize_and_connect(ctx, client, startup, conn_id, log, out)
        except _Refused as exc:
            await _refuse(ctx, client, startup, exc.refusal, out, log, cache=exc.cache)
            return
        except _ForwardBackendError as exc:
            out.outcome = "backend_error"
            out.sqlstate = exc.fields.get("C")
            out.detail = exc.fields.get("M")
            await _send_quietly(client, ErrorResponse(exc.fields).encode())
            return
    if handshake_done is not None:
        handshake_done()
    if handshake_scope.cancelled_caught:
        out.outcome = "handshake_timeout"
        out.sqlstate = "08006"
        if startup is not None:
            await _send_quietly(
                client,
                build_error_response("FATAL", "08006", "Waypoint handshake timed out; try again"),
            )
        return
    ctx.metrics.handshake_done(ctx.listener.name, trio.current_time() - handshake_started)
    if console is not None:
        assert startup is not None and ctx.console is not None
        out.outcome = "console"
        await serve_console(
            ctx.console,
            console,
            startup.parameters,
            client.send,
            client.receive,
            pending,
            _console_preamble(startup),
            functools.partial(_recheck_console, ctx, client, conn_id),
        )
        return
    assert established is not None
    backend, start, slot, live = established
    link = _BackendLink(backend.socket_stream.socket)
    try:
        await _relay(ctx, client, backend, start, live, link, pending, out, log)
    finally:
        with trio.CancelScope(shield=True):
            await _end_session(ctx, client, backend, start, slot, live, link, out, log)


@attrs.define(eq=False)
class _BackendLink:
    """The backend connection's raw socket, kept open past the relay for the backend's end."""

    sock: trio.socket.SocketType | None


async def _end_session(
    ctx: ListenerContext,
    client: _Client,
    backend: BackendConnection,
    start: BackendSessionStart,
    slot: SlotLease,
    live: LiveSession,
    link: _BackendLink,
    out: _Outcome,
    log: EventLogger,
) -> None:
    """The one way a relayed session ends, whatever ended its relay (the caller shields it):
    the client's connection closes, the backend is ended (:mod:`waypoint.proxy.backend_end`),
    and only then are the session's slot and cancel key given back, so the limits count
    what exists on the server."""
    live.closing = True
    reason = live.end_kind or out.relay_reason or "cancelled"
    key = start.key
    cancel = terminate = None
    if key is not None:
        pid, secret = key.pid, key.secret

        async def cancel() -> None:
            # Waypoint's own cancel, to the configured backend (no rate limit or identity).
            await send_cancel(
                ctx.listener.backend_address, pid, secret, ctx.listener, ctx.backend_ssl
            )

        async def terminate(wait: float) -> bool:
            return await terminate_pid(ctx.provisioner.pools, pid, live.role, wait)

    began = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_close_client, client)
            ended = await stop_backend(
                link.sock,
                closed_by_backend=out.relay_reason == "backend_closed",
                send_cancel=cancel,
                terminate=terminate,
                bound=ctx.config.backend_end_timeout,
            )
        out.backend_end = ended
        out.backend_end_ms = round((trio.current_time() - began) * 1000, 1)
        ctx.metrics.backend_ended(ctx.listener.name, reason, ended.how)
    finally:
        # Whatever happened above, the session's resources go back (last: the slot).
        if link.sock is not None:
            link.sock.close()
        with trio.move_on_after(1):
            await backend.aclose()
        ctx.registry.remove(live)
        with trio.move_on_after(2):
            await ctx.state.release_slot(slot)
            if key is not None:
                try:
                    await ctx.state.unregister_cancel_key(key.pid, key.secret)
                except Exception as exc:
                    log.warning("cancel_key_unregister_failed", error=str(exc))


async def _close_client(client: _Client) -> None:
    with (
        trio.move_on_after(1),
        contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError
        ),
    ):
        await client.stream.aclose()


async def _send_quietly(client: _Client, data: bytes) -> None:
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(1),
        contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError
        ),
    ):
        await client.send(data)


async def _refuse(
    ctx: ListenerContext,
    client: _Client,
    startup: StartupMessage | None,
    refusal: Refusal,
    out: _Outcome,
    log: EventLogger,
    *,
    cache: bool,
) -> None:
    out.outcome = "refused"
    out.sqlstate = refusal.sqlstate
    out.detail = refusal.detail or refusal.message
    ctx.metrics.refused(ctx.listener.name, refusal.sqlstate)
    if cache and startup is not None:
        ctx.refusals.put(client.peer[0], startup.parameters, refusal)
    await _send_quietly(
        client,
        build_error_response("FATAL", refusal.sqlstate, refusal.message, hint=refusal.hint),
    )


# --------------------------------------------------------------------------- first packet


async def _negotiate(ctx: ListenerContext, client: _Client) -> tuple[StartupMessage | None, bytes]:
    """SSLRequest / GSSENCRequest / direct TLS / CancelRequest loop up to the StartupMessage.

    Returns (startup, bytes the client sent after it), or (None, b"") when the connection
    was a cancel request."""
    reader = FirstPacketReader()
    rounds = 0
    while True:
        try:
            event = reader.next_event()
        except ProtocolError as exc:
            raise _Refused(Refusal(exc.sqlstate, str(exc)), cache=False) from exc
        if event is None:
            reader.feed(await client.receive())
            continue
        rounds += 1
        if rounds > MAX_NEGOTIATION_ROUNDS:
            raise _Refused(errors.protocol_violation("too many negotiation requests"), cache=False)
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
                raise _Refused(errors.protocol_violation("SSLRequest inside TLS"), cache=False)
            if reader.buffered:
                # Bytes sent before our answer travelled in plaintext (CVE-2021-23214).
                raise _Close("client sent data after SSLRequest before the answer")
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
                raise _Close("direct TLS on a listener without TLS")
            hello = await _read_client_hello(client, event.data)
            await _start_tls(ctx, client, hello, direct=True)
            reader = FirstPacketReader()
            continue
        raise _Close(f"unexpected first packet {type(event).__name__}")  # pragma: no cover


async def _read_client_hello(client: _Client, have: bytes) -> bytes:
    buf = bytearray(have)
    while True:
        try:
            n = client_hello_length(buf)
        except ClientHelloError as exc:
            raise _Close(f"bad TLS ClientHello: {exc}") from exc
        if n is not None:
            return bytes(buf)
        buf += await client.receive()


async def _start_tls(ctx: ListenerContext, client: _Client, hello: bytes, *, direct: bool) -> None:
    try:
        info = parse_client_hello(hello)
    except ClientHelloError as exc:
        raise _Close(f"bad TLS ClientHello: {exc}") from exc
    if direct and ALPN_POSTGRESQL not in info.alpn:
        # PostgreSQL 17 refuses direct TLS without ALPN "postgresql" (protects against
        # cross-protocol attacks); so do we.
        raise _Close("direct TLS without ALPN postgresql")
    context = await ctx.tls.context_for(info.server_name)
    if context is None:
        raise _Close(f"no certificate for server name {info.server_name!r}")
    # Waypoint's own SSLObject and memory BIOs from the first byte: the peeked ClientHello is
    # its first input, and the relay later takes this very TLS state over (``handover``).
    tls_stream = ServerTLSStream(client.raw, context, hello)
    try:
        await tls_stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
        raise _Close(f"TLS handshake failed: {exc}") from exc
    if direct and tls_stream.selected_alpn_protocol() != ALPN_POSTGRESQL:
        raise _Close("direct TLS: ALPN postgresql was not negotiated")
    client.stream = tls_stream
    client.tls = True
    client.tls_version = tls_stream.version()


# --------------------------------------------------------------------------- authorization


_OWN_PARAMETERS = frozenset({"user", "database", "replication"})


async def _authorize_and_connect(
    ctx: ListenerContext,
    client: _Client,
    startup: StartupMessage,
    conn_id: str,
    log: EventLogger,
    out: _Outcome,
) -> tuple[BackendConnection, BackendSessionStart, SlotLease, LiveSession]:
    listener = ctx.listener
    params = startup.parameters
    if not ctx.accepting:
        raise _Refused(errors.not_accepting(), cache=False)
    cached = ctx.refusals.get(client.peer[0], params)
    if listener.tls_mode == "require" and not client.tls:
        raise _Refused(errors.tls_required(cached.message if cached else None), cache=False)
    if cached is not None:
        raise _Refused(cached, cache=False)
    user = params.get("user")
    if not user:
        raise _Refused(
            Refusal(errors.NOT_AUTHORIZED, "no PostgreSQL user name specified in startup packet")
        )
    database = params.get("database") or user
    out.database = database
    replication = params.get("replication", "").lower()
    if replication not in ("", "false", "off", "no", "0"):
        raise _Refused(errors.replication_refused())

    cap = parse_preset_cap(params)
    if isinstance(cap, Refusal):
        raise _Refused(cap)
    forward = {
        k: v
        for k, v in cap.forward_parameters.items()
        if k not in _OWN_PARAMETERS and not k.startswith("_pq_.")
    }

    protocol = _backend_protocol(startup)
    prefetch = _plan_prefetch(ctx, client.peer[0], database, forward, protocol)
    established = False
    try:
        result = await _establish(
            ctx, client, startup, database, cap, forward, prefetch, conn_id, log, out
        )
        established = True
        live = result[3]
        owner = ctx.provisioner.owner_of(live.identity, live.grant)
        guess = LoginGuess.of(live.role, database, forward, protocol, owner)
        ctx.warm_peers.mark(client.peer[0], guess)
        return result
    finally:
        if not established:
            ctx.warm_peers.forget(client.peer[0])
        if prefetch is not None:
            await prefetch.aclose()


def _backend_protocol(startup: StartupMessage) -> tuple[int, int]:
    """The protocol version Waypoint asks the backend for: the client's, up to 3.2."""
    return (3, min(startup.protocol[1], MAX_MINOR))


def _plan_prefetch(
    ctx: ListenerContext,
    peer_ip: str,
    database: str,
    forward: Mapping[str, str],
    protocol: tuple[int, int],
) -> BackendPrefetch | None:
    """For a warm peer, the backend connection to open during its whois; logged in as its
    last role when it asks for the same session and that role's credentials are cached."""
    if not ctx.warm_peers.is_warm(peer_ip):
        return None
    guess = ctx.warm_peers.guess(peer_ip)
    login = None
    if guess is not None and guess.same_session(database, forward, protocol):
        creds = ctx.provisioner.peek(guess.role, guess.owner)
        if creds is not None:
            login = _backend_login(ctx, creds, database, forward, protocol)
    return BackendPrefetch(ctx.listener, ctx.backend_ssl, ctx.metrics, login)


def _backend_login(
    ctx: ListenerContext,
    creds: Credentials,
    database: str,
    forward: Mapping[str, str],
    protocol: tuple[int, int],
) -> BackendLogin:
    return BackendLogin(
        role=creds.role,
        secret=creds.secret,
        scram_keys=creds.scram_keys,
        database=database,
        parameters=dict(forward),
        protocol=protocol,
        limiter=ctx.pbkdf2_limiter,
    )


async def _whois(
    ctx: ListenerContext, client: _Client, prefetch: BackendPrefetch | None
) -> Identity | Refusal:
    """Who the peer is; with a prefetch, its backend connection opens meanwhile."""
    if prefetch is None:
        try:
            return await ctx.identity.whois(*client.peer)
        except IdentityError as exc:
            return exc.refusal
    answer: Identity | Refusal
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefetch.run)
        try:
            answer = await ctx.identity.whois(*client.peer)
        except IdentityError as exc:
            answer = exc.refusal
            nursery.cancel_scope.cancel()  # no backend connection for a refused peer
    return answer


async def _establish(
    ctx: ListenerContext,
    client: _Client,
    startup: StartupMessage,
    database: str,
    cap: PresetCapResult,
    forward: dict[str, str],
    prefetch: BackendPrefetch | None,
    conn_id: str,
    log: EventLogger,
    out: _Outcome,
) -> tuple[BackendConnection, BackendSessionStart, SlotLease, LiveSession]:
    listener = ctx.listener
    identity = await _whois(ctx, client, prefetch)
    if isinstance(identity, Refusal):
        raise _Refused(identity)
    out.identity = identity
    log = log.bind(login=identity.login, node=identity.node, db=database)

    grant = evaluate(
        identity,
        listener.name,
        database,
        admin_database=listener.postgres.admin_database,
        defaults=ctx.config.defaults.limits,
        preset_cap=cap.cap,
        allow_raw_sql=ctx.allow_raw_sql,
    )
    if isinstance(grant, Refusal):
        raise _Refused(grant)
    if ctx.console is not None:
        locked = await ctx.console.lock_refusal(identity)
        if locked is not None:
            raise _Refused(locked, cache=False)

    lease = await ctx.state.acquire_slot(
        SlotRequest(
            principal=identity.principal,
            listener=listener.name,
            max_user=grant.limits.max_conns_user,
            max_user_listener=grant.limits.max_conns_listener,
            max_total=ctx.config.defaults.limits.max_conns_total,
        )
    )
    if isinstance(lease, Refusal):
        raise _Refused(lease, cache=False)
    try:
        backend, start, role = await _provision_and_login(
            ctx, startup, identity, grant, database, forward, prefetch, conn_id, log, out
        )
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await ctx.state.release_slot(lease)
        raise
    try:
        # The client sees: NegotiateProtocolVersion (if due), AuthenticationOk, then the
        # backend's own ParameterStatus / BackendKeyData / notices and ReadyForQuery.
        preamble = bytearray()
        npv = _client_negotiation(startup, start.negotiate)
        if npv is not None:
            preamble += npv.encode()
        preamble += AuthenticationOk().encode()
        preamble += start.raw
        await client.send(bytes(preamble))
        if start.key is not None:
            target = CancelTarget(listener.name, backend.address, identity.principal)
            await ctx.state.register_cancel_key(
                start.key.pid, start.key.secret, target, CANCEL_KEY_TTL
            )
    except BaseException:
        # An idle backend that just logged in: it exits on the end of its stream. Closed
        # before the slot goes back.
        with trio.CancelScope(shield=True):
            await backend.aclose()
            with trio.move_on_after(2):
                await ctx.state.release_slot(lease)
        raise
    live = LiveSession(
        conn_id=conn_id,
        listener=listener.name,
        peer=client.peer,
        identity=identity,
        grant=grant,
        database=database,
        preset_cap=cap.cap,
        role=role,
        started=trio.current_time(),
        backend_pid=start.key.pid if start.key is not None else None,
        tls=client.tls,
        owner=ctx,
    )
    ctx.registry.add(live)
    return backend, start, lease, live


def _client_negotiation(
    startup: StartupMessage, backend_npv: NegotiateProtocolVersion | None
) -> NegotiateProtocolVersion | None:
    """The one NegotiateProtocolVersion the client gets, if something changed (docs/protocol.md)."""
    requested = startup.protocol[1]
    asked_backend = min(requested, MAX_MINOR)
    backend_minor = backend_npv.newest_minor if backend_npv is not None else asked_backend
    final = min(requested, MAX_MINOR, backend_minor)
    options = startup.protocol_options
    if final == requested and not options:
        return None
    return NegotiateProtocolVersion(final, options)


async def _provision_and_login(
    ctx: ListenerContext,
    startup: StartupMessage,
    identity: Identity,
    grant: EffectiveGrant,
    database: str,
    forward: Mapping[str, str],
    prefetch: BackendPrefetch | None,
    conn_id: str,
    log: EventLogger,
    out: _Outcome,
) -> tuple[BackendConnection, BackendSessionStart, str]:
    protocol = _backend_protocol(startup)
    rotate = False
    while True:
        # The backend connection first: a backend that is down is 08006 "unavailable" (the
        # provisioner's admin connection would fail too, and say 58000 "provisioning failed").
        # A session the prefetch logged in already is taken below if the credentials match.
        backend: BackendConnection | None = None
        try:
            if prefetch is not None and prefetch.available:
                backend = prefetch.take()
            elif prefetch is None or not prefetch.logged_in or rotate:
                backend = await connect_backend(ctx.listener, ctx.backend_ssl)
        except BackendUnavailable as exc:
            raise _Refused(
                errors.backend_unavailable(ctx.listener.name, str(exc)), cache=False
            ) from exc
        logged_in = False
        t0 = trio.current_time()
        try:
            async with ctx.provisioner.credentials(identity, grant, rotate=rotate) as creds:
                if creds.provisioned:
                    ctx.metrics.provisioned(ctx.listener.name, trio.current_time() - t0)
                out.role = creds.role
                if backend is None:
                    assert prefetch is not None
                    ready = (
                        None
                        if creds.provisioned
                        else prefetch.take_session(creds.role, creds.secret)
                    )
                    if ready is not None:
                        logged_in = True
                        return ready[0], ready[1], creds.role
                    backend = await connect_backend(ctx.listener, ctx.backend_ssl)
                start = await login_backend(
                    backend, _backend_login(ctx, creds, database, forward, protocol)
                )
                logged_in = True
                return backend, start, creds.role
        except DatabaseMissing as exc:
            raise _ForwardBackendError(exc.fields) from exc
        except ProvisionError as exc:
            ctx.metrics.provision_failed(ctx.listener.name)
            refusal = exc.refusal
            log.error("provision_failed", sqlstate=refusal.sqlstate, detail=refusal.detail)
            raise _Refused(refusal, cache=refusal.sqlstate != errors.PROVISIONING_FAILED) from exc
        except BackendError as exc:
            if exc.sqlstate == "28P01":
                if not rotate and not creds.provisioned:
                    # Another instance rotated the secret: provision once more.
                    log.info("backend_login_rotating", role=creds.role)
                    rotate = True
                    continue
                ctx.metrics.backend_login_failed(ctx.listener.name)
                raise _Refused(
                    errors.backend_login_failed(f"backend said 28P01 for role {creds.role}"),
                    cache=False,
                ) from exc
            raise _ForwardBackendError(exc.fields) from exc
        except (LoginError, ProtocolError) as exc:
            ctx.metrics.backend_login_failed(ctx.listener.name)
            raise _Refused(errors.backend_login_failed(str(exc)), cache=False) from exc
        except BackendUnavailable as exc:
            raise _Refused(
                errors.backend_unavailable(ctx.listener.name, str(exc)), cache=False
            ) from exc
        finally:
            if not logged_in and backend is not None:
                await backend.aclose()


# --------------------------------------------------------------------------- console


def _asks_for_console(ctx: ListenerContext, startup: StartupMessage) -> bool:
    params = startup.parameters
    database = params.get("database") or params.get("user")
    return ctx.console is not None and database == ctx.listener.console_database


async def _authorize_console(
    ctx: ListenerContext, client: _Client, conn_id: str, out: _Outcome
) -> Caller:
    """Who may use this listener's console database: a known peer whose grant gives
    ``"console"`` for the listener, and whose login is not locked."""
    out.database = ctx.listener.console_database
    if not ctx.accepting:
        raise _Refused(errors.not_accepting(), cache=False)
    if ctx.listener.tls_mode == "require" and not client.tls:
        raise _Refused(errors.tls_required(), cache=False)
    caller = await _recheck_console(ctx, client, conn_id)
    if isinstance(caller, Refusal):
        raise _Refused(caller, cache=False)
    out.identity = caller.identity
    return caller


async def _recheck_console(ctx: ListenerContext, client: _Client, conn_id: str) -> Caller | Refusal:
    """The console caller as of now (identity, grant, locks), or why it is refused."""
    assert ctx.console is not None
    try:
        identity = await ctx.identity.whois(*client.peer)
    except IdentityError as exc:
        return exc.refusal
    access = console_access(identity, ctx.listener.name)
    if isinstance(access, Refusal):
        return access
    locked = await ctx.console.lock_refusal(identity)
    if locked is not None:
        return locked
    return Caller(
        identity, access, ctx.listener.name, conn_id, f"{client.peer[0]}:{client.peer[1]}"
    )


def _console_preamble(startup: StartupMessage) -> bytes:
    """The console speaks protocol 3.0 only: a newer client is told so first."""
    if startup.protocol[1] == 0 and not startup.protocol_options:
        return b""
    return NegotiateProtocolVersion(0, startup.protocol_options).encode()


# --------------------------------------------------------------------------- relay


def _client_tls_handover(client: _Client) -> TlsHandover | None:
    """The client's TLS session for the engine, or None (then the trio stream relay serves
    it): Waypoint's own TLS stream over the accepted socket, intact and with nothing unsent."""
    stream = client.stream
    if not isinstance(stream, ServerTLSStream) or stream.transport_stream is not client.raw:
        return None
    try:
        return stream.handover()
    except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
        return None


def _detach(stream: trio.SocketStream) -> socket.socket:
    fd = stream.socket.detach()
    return socket.socket(fileno=fd)


async def _relay(
    ctx: ListenerContext,
    client: _Client,
    backend: BackendConnection,
    start: BackendSessionStart,
    live: LiveSession,
    link: _BackendLink,
    pending: bytes,
    out: _Outcome,
    log: EventLogger,
) -> None:
    limits = live.grant.limits
    byte_limit_fatal = b""
    if limits.max_bytes_per_conn > 0:
        byte_limit_fatal = fatal_bytes(
            errors.session_limit("max_bytes_per_conn", f"{limits.max_bytes_per_conn} bytes")
        )
    audit = _session_audit(ctx, client, live)
    result: RelayResult
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_duration_timer, live)
        # The epoll engine relays plain sockets and client TLS (the session's own SSLObject
        # and BIOs, handed over after the startup); backend TLS stays on the trio stream relay.
        handover: TlsHandover | None = None
        use_engine = ctx.engine is not None and not backend.tls
        if use_engine and client.tls:
            handover = _client_tls_handover(client)
            use_engine = handover is not None
        if ctx.engine is not None and use_engine:
            client_sock = _detach(client.raw)
            backend_sock = _detach(backend.socket_stream)
            # The backend socket outlives the relay: the session's end reads its EOF.
            link.sock = trio.socket.from_stdlib_socket(backend_sock)
            try:
                handle = ctx.engine.start_relay(
                    client_sock,
                    backend_sock,
                    client_tls=handover,
                    max_bytes=limits.max_bytes_per_conn,
                    byte_limit_error=byte_limit_fatal,
                    initial_to_client=start.leftover,
                    initial_to_backend=pending,
                    audit=audit,
                )
                live.attach(handle)
                if handle.tls_record_layer is not None:
                    ctx.metrics.client_tls_relayed(ctx.listener.name, handle.tls_record_layer)
                result = await handle.wait()
            finally:
                client_sock.close()
        else:
            relay = StreamRelay(
                client.stream,
                backend.stream,
                max_bytes=limits.max_bytes_per_conn,
                byte_limit_error=byte_limit_fatal,
                initial_to_client=start.leftover,
                initial_to_backend=pending,
                audit=audit,
            )
            live.attach(relay)
            if client.tls:
                ctx.metrics.client_tls_relayed(ctx.listener.name, "stream")
            result = await relay.wait()
        nursery.cancel_scope.cancel()
    out.bytes_in = result.bytes_from_client
    out.bytes_out = result.bytes_from_backend
    out.relay_reason = result.reason
    if result.reason == "terminated" and audit is not None and audit.closed:
        out.outcome = "ended"
        out.sqlstate = errors.AUDIT_UNAVAILABLE
        out.detail = "audit sink cannot record statements"
        live.end_kind = live.end_kind or "audit_unavailable"
    elif result.reason == "terminated" and live.ended_by is not None:
        out.outcome = "ended"
        out.sqlstate = live.ended_by.sqlstate
        out.detail = live.ended_by.message
    elif result.reason == "byte_limit":
        out.outcome = "ended"
        out.sqlstate = errors.LIMIT_REACHED
        out.detail = "max_bytes_per_conn"
    elif result.reason == "error":
        out.outcome = "relay_error"
        out.detail = result.error
    else:
        out.outcome = result.reason


def _session_audit(ctx: ListenerContext, client: _Client, live: LiveSession) -> SessionAudit | None:
    """This session's statement audit (None when audit is off), set on ``live``."""
    if ctx.audit is None:
        return None
    identity = live.identity
    live.audit = ctx.audit.for_session(
        listener=live.listener,
        conn_id=live.conn_id,
        client=f"{live.peer[0]}:{live.peer[1]}",
        login=identity.login,
        node=identity.node,
        node_id=identity.node_id or None,
        tags=list(identity.tags),
        database=live.database,
        role=live.role,
        tls=client.tls,
    )
    return live.audit


def set_duration_deadline(live: LiveSession) -> None:
    """Point the session's ``max_conn_duration`` timer at its grant's limit (revalidation
    calls this after a grant change: a lower limit already passed ends the session now)."""
    scope = live.duration_scope
    if scope is not None:
        seconds = live.grant.limits.max_conn_duration
        scope.deadline = live.started + seconds if seconds > 0 else math.inf


async def _duration_timer(live: LiveSession) -> None:
    with trio.CancelScope() as scope:
        live.duration_scope = scope
        set_duration_deadline(live)
        await trio.sleep_forever()
    live.duration_scope = None
    if scope.cancelled_caught:
        seconds = live.grant.limits.max_conn_duration
        live.end(
            errors.session_limit("max_conn_duration", format_duration(seconds)),
            "max_conn_duration",
        )
