"""One client connection, start to end (docs/protocol.md, docs/architecture.md): first packet,
TLS, identity, grant, slot, a logged-in backend, relay, and the one log line when it ends.

A connection's state lives on one :class:`Session` (hypercorn's ``TCPServer`` is the model):
``run`` is its whole life and ends in one shielded ``finally`` (:meth:`Session._end`). Its
parts: the client side of the handshake (:mod:`waypoint.proxy.handshake`), authorization and
the slot (here), the logged-in backend (:mod:`waypoint.proxy.source`), and the relay or the
console. Every step before the relay runs inside one cancel scope bounded by
``handshake_timeout``. A failure here ends this connection only: the task catches its own
errors.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import attrs
import trio

from waypoint import errors
from waypoint.audit.session import SessionAudit
from waypoint.config.units import format_duration
from waypoint.console.hub import Caller
from waypoint.console.server import serve_console
from waypoint.errors import Refusal
from waypoint.grants.evaluate import console_access, evaluate
from waypoint.grants.model import EffectiveGrant, Preset
from waypoint.grants.presets import parse_preset_cap
from waypoint.identity.model import Identity, IdentityError
from waypoint.observability.log import EventLogger, get_logger
from waypoint.pgwire import (
    AuthenticationOk,
    BackendKeyData,
    ErrorResponse,
    NegotiateProtocolVersion,
    StartupMessage,
    build_error_response,
)
from waypoint.pool import client_cancel_key, with_client_key
from waypoint.proxy.backend_end import BackendEnd
from waypoint.proxy.context import ListenerContext
from waypoint.proxy.handshake import (
    ClientConnection,
    Close,
    ForwardBackendError,
    Refused,
    negotiate,
    peer_of,
)
from waypoint.proxy.registry import (
    LiveSession,
    fatal_bytes,
    new_conn_id,
    set_duration_deadline,
)
from waypoint.proxy.relay import RelayControl, RelayResult, StreamRelay, TlsHandover
from waypoint.proxy.source import BackendRequest, LoggedInBackend
from waypoint.proxy.streams import ServerTLSStream
from waypoint.state.base import CancelTarget, SlotLease, SlotRequest

# Newest protocol minor version Waypoint speaks (3.2: variable-length cancel keys).
MAX_MINOR = 2
# Cancel keys live this long in shared state at most (a session ends sooner, and unregisters).
CANCEL_KEY_TTL = 7 * 24 * 3600.0

_OWN_PARAMETERS = frozenset({"user", "database", "replication"})


async def serve_connection(
    ctx: ListenerContext,
    raw: trio.SocketStream,
    handshake_done: Callable[[], None] | None = None,
) -> None:
    """The connection task. Never raises (except Cancelled): one bad client affects nobody.
    ``handshake_done`` is called once the handshake is over (before the relay starts)."""
    conn_id = new_conn_id()
    peer = peer_of(raw)
    log = get_logger(
        "session", conn_id=conn_id, listener=ctx.listener.name, peer=f"{peer[0]}:{peer[1]}"
    )
    session = Session(ctx, ClientConnection(raw, raw, peer), conn_id, log, handshake_done)
    await session.run()


@attrs.define(eq=False)
class Session:
    """One client connection: what its handshake found, what it holds, and what its one log
    line reports."""

    ctx: ListenerContext
    client: ClientConnection
    conn_id: str
    log: EventLogger
    handshake_done: Callable[[], None] | None = None
    started: float = attrs.field(factory=trio.current_time)

    # What the handshake found.
    startup: StartupMessage | None = None
    #: Bytes the client sent after its StartupMessage (go to the backend first).
    pending: bytes = b""
    database: str | None = None
    identity: Identity | None = None
    #: A console session's caller (None: a relayed session).
    caller: Caller | None = None

    # What the session holds; :meth:`_end` gives each back.
    slot: SlotLease | None = None
    backend: LoggedInBackend | None = None
    #: The backend's cancel key, once registered in shared state.
    cancel_key: BackendKeyData | None = None
    live: LiveSession | None = None

    # What the ``connection_end`` line reports.
    outcome: str = "closed"
    sqlstate: str | None = None
    detail: str | None = None
    role: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    relay_reason: str | None = None
    backend_end: BackendEnd | None = None
    backend_end_ms: float | None = None
    #: The relay's word on how the session ended (``RelayResult.ready_status``): the
    #: backend's last ReadyForQuery status when it ended in step; None otherwise.
    ready_status: bytes | None = None

    async def run(self) -> None:
        self.ctx.metrics.connection_opened(self.ctx.listener.name)
        try:
            await self._serve()
        except Close as exc:
            self.outcome = "closed"
            self.detail = str(exc)
        except Exception as exc:  # a bug: log it, end this connection only
            self.outcome = "error"
            self.detail = f"{type(exc).__name__}: {exc}"
            self.log.error("session_internal_error", exc_info=True, error=self.detail)
        finally:
            with trio.CancelScope(shield=True):
                await self._end()

    async def _serve(self) -> None:
        ctx = self.ctx
        began = trio.current_time()
        with trio.move_on_after(ctx.config.handshake_timeout) as handshake:
            try:
                self.startup, self.pending = await negotiate(ctx, self.client)
                if self.startup is None:
                    return  # a CancelRequest, served
                if self._asks_for_console(self.startup):
                    await self._authorize_console()
                else:
                    await self._authorize_and_open(self.startup)
            except Refused as exc:
                await self._refuse(exc.refusal, cache=exc.cache)
                return
            except ForwardBackendError as exc:
                self.outcome = "backend_error"
                self.sqlstate = exc.fields.get("C")
                self.detail = exc.fields.get("M")
                await self.client.send_quietly(ErrorResponse(exc.fields).encode())
                return
        if self.handshake_done is not None:
            self.handshake_done()
        if handshake.cancelled_caught:
            self.outcome = "handshake_timeout"
            self.sqlstate = "08006"
            if self.startup is not None:
                await self.client.send_quietly(
                    build_error_response(
                        "FATAL", "08006", "Waypoint handshake timed out; try again"
                    )
                )
            return
        ctx.metrics.handshake_done(ctx.listener.name, trio.current_time() - began)
        if self.caller is not None:
            await self._serve_console()
        else:
            await self._relay()

    async def _end(self) -> None:
        """The one way a session ends, whatever ended it (shielded by the caller): the client's
        connection closes while the backend is ended (the source takes it back), and only then
        are the registry entry, the slot and the cancel key given back, so the limits count
        what exists on the server; last, the one log line."""
        ctx = self.ctx
        if self.live is not None:
            self.live.closing = True
        try:
            # The client's cancel key goes first: it must cancel nothing of whoever the
            # backend serves next (a pooled backend is kept only when it is gone).
            withdrawn = await self._withdraw_cancel_key()
            if self.client.tls and self.backend is not None:
                # Closing TLS sends close_notify, which may wait on the client: beside the
                # backend's end, not before it.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.client.close)
                    await self._end_backend(self.backend, keep=withdrawn)
            else:
                await self.client.close()
                if self.backend is not None:
                    await self._end_backend(self.backend, keep=withdrawn)
        finally:
            if self.live is not None:
                ctx.registry.remove(self.live)
            if self.slot is not None:
                with trio.move_on_after(2):
                    await ctx.state.release_slot(self.slot)
            self._log_end()

    async def _withdraw_cancel_key(self) -> bool:
        """Unregister the client's cancel key (bounded); whether it is gone (or there was
        none)."""
        key = self.cancel_key
        if key is None:
            return True
        with trio.move_on_after(2):
            try:
                await self.ctx.state.unregister_cancel_key(key.pid, key.secret)
            except Exception as exc:
                self.log.warning("cancel_key_unregister_failed", error=str(exc))
                return False
            return True
        self.log.warning("cancel_key_unregister_failed", error="timed out")
        return False

    async def _end_backend(self, backend: LoggedInBackend, *, keep: bool) -> None:
        """Hand the backend back to its source, which ends it, or keeps it idle for the role's
        next session (``keep``: the client's cancel key is gone, so it may)."""
        live = self.live
        reason = (live.end_kind if live is not None else None) or self.relay_reason or "cancelled"
        began = trio.current_time()
        ended = await self.ctx.backends.release(
            backend,
            closed_by_backend=self.relay_reason == "backend_closed",
            ready_status=self.ready_status if keep else None,
        )
        self.backend_end = ended
        self.backend_end_ms = round((trio.current_time() - began) * 1000, 1)
        self.ctx.metrics.backend_ended(self.ctx.listener.name, reason, ended.how)

    def _log_end(self) -> None:
        ctx = self.ctx
        ctx.metrics.connection_closed(
            ctx.listener.name, self.outcome, self.sqlstate, self.bytes_in, self.bytes_out
        )
        ident = self.identity
        ended = self.backend_end
        self.log.info(
            "connection_end",
            outcome=self.outcome,
            sqlstate=self.sqlstate,
            login=ident.login if ident else None,
            node=ident.node if ident else None,
            db=self.database,
            role=self.role,
            tls=self.client.tls,
            relay_end=self.relay_reason,
            backend_end=ended.how if ended else None,
            backend_end_detail=ended.detail if ended else None,
            backend_end_ms=self.backend_end_ms,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration_ms=round((trio.current_time() - self.started) * 1000, 1),
            detail=self.detail,
        )

    async def _refuse(self, refusal: Refusal, *, cache: bool) -> None:
        ctx = self.ctx
        self.outcome = "refused"
        self.sqlstate = refusal.sqlstate
        self.detail = refusal.detail or refusal.message
        ctx.metrics.refused(ctx.listener.name, refusal.sqlstate)
        if cache and self.startup is not None:
            ctx.refusals.put(self.client.peer[0], self.startup.parameters, refusal)
        await self.client.send_quietly(
            build_error_response("FATAL", refusal.sqlstate, refusal.message, hint=refusal.hint)
        )

    # ----------------------------------------------------------------------- authorization

    def _request(self, startup: StartupMessage) -> tuple[BackendRequest, Preset | None]:
        """What the client asks for, checked before anything is looked up: the backend
        session to ask for, and the preset cap it named (if any)."""
        ctx = self.ctx
        params = startup.parameters
        if not ctx.accepting:
            raise Refused(errors.not_accepting(), cache=False)
        cached = ctx.refusals.get(self.client.peer[0], params)
        if ctx.listener.tls_mode == "require" and not self.client.tls:
            raise Refused(errors.tls_required(cached.message if cached else None), cache=False)
        if cached is not None:
            raise Refused(cached, cache=False)
        user = params.get("user")
        if not user:
            raise Refused(
                Refusal(
                    errors.NOT_AUTHORIZED, "no PostgreSQL user name specified in startup packet"
                )
            )
        database = params.get("database") or user
        self.database = database
        replication = params.get("replication", "").lower()
        if replication not in ("", "false", "off", "no", "0"):
            raise Refused(errors.replication_refused())
        cap = parse_preset_cap(params)
        if isinstance(cap, Refusal):
            raise Refused(cap)
        forward = {
            k: v
            for k, v in cap.forward_parameters.items()
            if k not in _OWN_PARAMETERS and not k.startswith("_pq_.")
        }
        return BackendRequest(database, forward, _backend_protocol(startup)), cap.cap

    async def _whois(self) -> Identity | Refusal:
        try:
            return await self.ctx.identity.whois(*self.client.peer)
        except IdentityError as exc:
            return exc.refusal

    async def _authorize_and_open(self, startup: StartupMessage) -> None:
        """Identity, grant, lock, slot, a logged-in backend; then the client's session start."""
        ctx = self.ctx
        request, preset_cap = self._request(startup)
        async with ctx.backends.order(self.client.peer[0], request) as order:
            identity = await order.identify(self._whois)
            if isinstance(identity, Refusal):
                raise Refused(identity)
            self.identity = identity
            self.log = self.log.bind(login=identity.login, node=identity.node, db=request.database)
            grant = evaluate(
                identity,
                ctx.listener.name,
                request.database,
                admin_database=ctx.listener.postgres.admin_database,
                defaults=ctx.config.defaults.limits,
                preset_cap=preset_cap,
                allow_raw_sql=ctx.allow_raw_sql,
            )
            if isinstance(grant, Refusal):
                raise Refused(grant)
            if ctx.console is not None:
                locked = await ctx.console.lock_refusal(identity)
                if locked is not None:
                    raise Refused(locked, cache=False)
            lease = await ctx.state.acquire_slot(
                SlotRequest(
                    principal=identity.principal,
                    listener=ctx.listener.name,
                    max_user=grant.limits.max_conns_user,
                    max_user_listener=grant.limits.max_conns_listener,
                    max_total=ctx.config.defaults.limits.max_conns_total,
                )
            )
            if isinstance(lease, Refusal):
                raise Refused(lease, cache=False)
            self.slot = lease
            try:
                self.backend = await order.open(identity, grant, self.log)
            finally:
                self.role = order.role
            await self._start_client_session(startup, identity, grant, preset_cap)

    async def _start_client_session(
        self,
        startup: StartupMessage,
        identity: Identity,
        grant: EffectiveGrant,
        preset_cap: Preset | None,
    ) -> None:
        """The client sees: NegotiateProtocolVersion (if due), AuthenticationOk, then the
        backend's own ParameterStatus / BackendKeyData / notices and ReadyForQuery. Its cancel
        key is registered, and the session is live."""
        ctx = self.ctx
        backend = self.backend
        assert backend is not None and self.database is not None
        start = backend.start
        preamble = bytearray()
        npv = _client_negotiation(startup, start.negotiate)
        if npv is not None:
            preamble += npv.encode()
        preamble += AuthenticationOk().encode()
        key = backend.key
        target = CancelTarget(ctx.listener.name, backend.connection.address, identity.principal)
        client_key = key
        if key is not None and backend.pooling:
            # A backend that may serve other sessions: the client gets a cancel key of its
            # own (the backend's pid, a fresh secret), mapped to the real one.
            minor = _final_minor(startup, start.negotiate)
            client_key, target = client_cancel_key(key, (3, minor), target)
            preamble += with_client_key(start.raw, client_key)
        else:
            preamble += start.raw
        await self.client.send(bytes(preamble))
        if client_key is not None:
            await ctx.state.register_cancel_key(
                client_key.pid, client_key.secret, target, CANCEL_KEY_TTL
            )
            self.cancel_key = client_key
        self.live = LiveSession(
            conn_id=self.conn_id,
            listener=ctx.listener.name,
            peer=self.client.peer,
            identity=identity,
            grant=grant,
            database=self.database,
            preset_cap=preset_cap,
            role=backend.role,
            started=trio.current_time(),
            backend_pid=key.pid if key is not None else None,
            tls=self.client.tls,
            owner=ctx,
        )
        ctx.registry.add(self.live)

    # ----------------------------------------------------------------------------- console

    def _asks_for_console(self, startup: StartupMessage) -> bool:
        params = startup.parameters
        database = params.get("database") or params.get("user")
        return self.ctx.console is not None and database == self.ctx.listener.console_database

    async def _authorize_console(self) -> None:
        """Who may use this listener's console database: a known peer whose grant gives
        ``"console"`` for the listener, and whose login is not locked."""
        ctx = self.ctx
        self.database = ctx.listener.console_database
        if not ctx.accepting:
            raise Refused(errors.not_accepting(), cache=False)
        if ctx.listener.tls_mode == "require" and not self.client.tls:
            raise Refused(errors.tls_required(), cache=False)
        caller = await self._recheck_console()
        if isinstance(caller, Refusal):
            raise Refused(caller, cache=False)
        self.identity = caller.identity
        self.caller = caller

    async def _recheck_console(self) -> Caller | Refusal:
        """The console caller as of now (identity, grant, locks), or why it is refused."""
        ctx, peer = self.ctx, self.client.peer
        assert ctx.console is not None
        try:
            identity = await ctx.identity.whois(*peer)
        except IdentityError as exc:
            return exc.refusal
        access = console_access(identity, ctx.listener.name)
        if isinstance(access, Refusal):
            return access
        locked = await ctx.console.lock_refusal(identity)
        if locked is not None:
            return locked
        return Caller(identity, access, ctx.listener.name, self.conn_id, f"{peer[0]}:{peer[1]}")

    async def _serve_console(self) -> None:
        assert self.startup is not None and self.caller is not None
        assert self.ctx.console is not None
        self.outcome = "console"
        await serve_console(
            self.ctx.console,
            self.caller,
            self.startup.parameters,
            self.client.send,
            self.client.receive,
            self.pending,
            _console_preamble(self.startup),
            self._recheck_console,
        )

    # ------------------------------------------------------------------------------- relay

    async def _relay(self) -> None:
        backend, live = self.backend, self.live
        assert backend is not None and live is not None
        audit = self._session_audit(live)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_duration_timer, live)
            result = await self._run_relay(backend, live, audit)
            nursery.cancel_scope.cancel()
        self._record_relay(result, live, audit)

    async def _run_relay(
        self, backend: LoggedInBackend, live: LiveSession, audit: SessionAudit | None
    ) -> RelayResult:
        """The epoll engine relays plain sockets and client TLS (the session's own SSLObject
        and BIOs, handed over after the startup); backend TLS stays on the trio stream relay."""
        ctx, client = self.ctx, self.client
        options = _RelayOptions.of(self, backend, live, audit)
        handover: TlsHandover | None = None
        use_engine = ctx.engine is not None and not backend.connection.tls
        if use_engine and client.tls:
            handover = _client_tls_handover(client)
            use_engine = handover is not None
        relay: RelayControl
        if ctx.engine is not None and use_engine:
            client_sock = _detach(client.raw)
            backend_sock = _detach(backend.connection.socket_stream)
            # The backend socket outlives the relay: the session's end reads its EOF.
            backend.sock = trio.socket.from_stdlib_socket(backend_sock)
            try:
                handle = ctx.engine.start_relay(
                    client_sock, backend_sock, client_tls=handover, **options.keywords()
                )
                live.attach(handle)
                if handle.tls_record_layer is not None:
                    ctx.metrics.client_tls_relayed(ctx.listener.name, handle.tls_record_layer)
                return await handle.wait()
            finally:
                client_sock.close()
        relay = StreamRelay(client.stream, backend.connection.stream, **options.keywords())
        live.attach(relay)
        if client.tls:
            ctx.metrics.client_tls_relayed(ctx.listener.name, "stream")
        return await relay.wait()

    def _record_relay(
        self, result: RelayResult, live: LiveSession, audit: SessionAudit | None
    ) -> None:
        self.bytes_in = result.bytes_from_client
        self.bytes_out = result.bytes_from_backend
        self.relay_reason = result.reason
        self.ready_status = result.ready_status
        if result.reason == "terminated" and audit is not None and audit.closed:
            self.outcome = "ended"
            self.sqlstate = errors.AUDIT_UNAVAILABLE
            self.detail = "audit sink cannot record statements"
            live.end_kind = live.end_kind or "audit_unavailable"
        elif result.reason == "terminated" and live.ended_by is not None:
            self.outcome = "ended"
            self.sqlstate = live.ended_by.sqlstate
            self.detail = live.ended_by.message
        elif result.reason == "byte_limit":
            self.outcome = "ended"
            self.sqlstate = errors.LIMIT_REACHED
            self.detail = "max_bytes_per_conn"
        elif result.reason == "error":
            self.outcome = "relay_error"
            self.detail = result.error
        else:
            self.outcome = result.reason

    def _session_audit(self, live: LiveSession) -> SessionAudit | None:
        """This session's statement audit (None when audit is off), set on ``live``."""
        if self.ctx.audit is None:
            return None
        identity = live.identity
        live.audit = self.ctx.audit.for_session(
            listener=live.listener,
            conn_id=live.conn_id,
            client=f"{live.peer[0]}:{live.peer[1]}",
            login=identity.login,
            node=identity.node,
            node_id=identity.node_id or None,
            tags=list(identity.tags),
            database=live.database,
            role=live.role,
            tls=self.client.tls,
        )
        return live.audit


@attrs.frozen
class _RelayOptions:
    """What a session's relay is told, whichever relay serves it (the epoll engine's
    ``start_relay`` or :class:`StreamRelay` take the same keywords)."""

    #: ``max_bytes_per_conn`` (0: none) over both directions, and the FATAL sent past it.
    max_bytes: int
    byte_limit_error: bytes
    #: What the backend sent after its ReadyForQuery, and the client after its startup.
    initial_to_client: bytes
    initial_to_backend: bytes
    audit: SessionAudit | None
    #: A pooling backend: the client's Terminate ends the relay and is not passed on.
    stop_at_terminate: bool

    @classmethod
    def of(
        cls,
        session: Session,
        backend: LoggedInBackend,
        live: LiveSession,
        audit: SessionAudit | None,
    ) -> _RelayOptions:
        limit = live.grant.limits.max_bytes_per_conn
        fatal = b""
        if limit > 0:
            fatal = fatal_bytes(errors.session_limit("max_bytes_per_conn", f"{limit} bytes"))
        return cls(
            max_bytes=limit,
            byte_limit_error=fatal,
            initial_to_client=backend.start.leftover,
            initial_to_backend=session.pending,
            audit=audit,
            stop_at_terminate=backend.pooling,
        )

    def keywords(self) -> dict[str, Any]:
        """The relay's keyword arguments (the field names are theirs)."""
        return attrs.asdict(self, recurse=False)


def _backend_protocol(startup: StartupMessage) -> tuple[int, int]:
    """The protocol version Waypoint asks the backend for: the client's, up to 3.2."""
    return (3, min(startup.protocol[1], MAX_MINOR))


def _final_minor(startup: StartupMessage, backend_npv: NegotiateProtocolVersion | None) -> int:
    """The protocol minor version the client ends up with."""
    requested = startup.protocol[1]
    asked_backend = min(requested, MAX_MINOR)
    backend_minor = backend_npv.newest_minor if backend_npv is not None else asked_backend
    return min(requested, MAX_MINOR, backend_minor)


def _client_negotiation(
    startup: StartupMessage, backend_npv: NegotiateProtocolVersion | None
) -> NegotiateProtocolVersion | None:
    """The one NegotiateProtocolVersion the client gets, if something changed (docs/protocol.md)."""
    requested = startup.protocol[1]
    final = _final_minor(startup, backend_npv)
    options = startup.protocol_options
    if final == requested and not options:
        return None
    return NegotiateProtocolVersion(final, options)


def _console_preamble(startup: StartupMessage) -> bytes:
    """The console speaks protocol 3.0 only: a newer client is told so first."""
    if startup.protocol[1] == 0 and not startup.protocol_options:
        return b""
    return NegotiateProtocolVersion(0, startup.protocol_options).encode()


def _client_tls_handover(client: ClientConnection) -> TlsHandover | None:
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
