"""Where a session's logged-in backend comes from, and where it goes at the session's end.

A session asks its listener's :class:`BackendSource` for a backend once it knows what the
client wants (:class:`BackendRequest`: database, startup parameters, protocol version). The
source gives it a :class:`BackendOrder` for that one connection: the session looks its peer
up through the order (``identify``; a source may prepare a backend meanwhile), checks the
grant and takes its slot, and then asks the order to ``open`` a backend for the caller's
identity and grant. Behind ``open``: provisioning (the role and its secret), the backend
connection (TCP, TLS per ``backend_tls``) and the login; what comes back is a
:class:`LoggedInBackend`: the connection, the role, and the backend's session start
(ParameterStatus, BackendKeyData, notices, ReadyForQuery) to forward to the client. At the
session's end, after the relay, the session hands it back with ``release``; the source ends
it (:mod:`waypoint.proxy.backend_end`) and says how.

The source here, :class:`ConnectingSource`, logs a new backend in for a session, or, with the
listener's ``pool`` on, hands it one a previous session of the same role left idle
(:mod:`waypoint.pool`, docs/architecture.md#backend-pooling): ``release`` then resets a backend
whose session ended in step and idle, and keeps it; anything else it ends.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Final, Protocol

import attrs
import trio

from waypoint import errors
from waypoint.config.model import ListenerConfig
from waypoint.errors import Refusal
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.lru import LRU
from waypoint.observability.log import EventLogger, get_logger
from waypoint.observability.metrics import Metrics
from waypoint.pgwire import BackendError, BackendKeyData, LoginError, ProtocolError
from waypoint.pool import (
    BackendPool,
    Pooled,
    PooledBackendFailed,
    PoolKey,
    PoolLimits,
    idle_cap,
    session_start,
    updated_parameters,
)
from waypoint.pool import check as pool_check
from waypoint.pool import peek as pool_peek
from waypoint.pool import reset as pool_reset
from waypoint.provision.backends import server_max_connections, terminate_pid
from waypoint.provision.engine import Credentials, DatabaseMissing, Provisioner, ProvisionError
from waypoint.proxy.backend import (
    BackendConnection,
    BackendLogin,
    BackendSessionStart,
    BackendUnavailable,
    connect_backend,
    login_backend,
)
from waypoint.proxy.backend_end import BackendEnd, stop_backend
from waypoint.proxy.cancel import send_cancel
from waypoint.proxy.handshake import ForwardBackendError, Refused

log = get_logger("source")


@attrs.frozen
class BackendRequest:
    """The backend session a client asked for, as Waypoint will ask the backend for it."""

    database: str
    #: The client's startup parameters that go to the backend (not ``user``, ``database``,
    #: ``replication``, ``_pq_.*`` or Waypoint's own preset cap).
    parameters: Mapping[str, str]
    #: The protocol version asked of the backend: the client's, up to the newest Waypoint speaks.
    protocol: tuple[int, int]
    #: ``parameters`` as a pool key holds them (made once: a pooled session looks its key up
    #: several times).
    key_parameters: tuple[tuple[str, str], ...] = attrs.field(init=False, eq=False, repr=False)

    @key_parameters.default
    def _key_parameters(self) -> tuple[tuple[str, str], ...]:
        return PoolKey.parameters_of(self.parameters)


@attrs.define(eq=False)
class LoggedInBackend:
    """A backend connection logged in as a session's role, ready for its first query."""

    connection: BackendConnection
    #: What the backend said from AuthenticationOk to ReadyForQuery (ParameterStatus,
    #: BackendKeyData, notices), forwarded verbatim to the client, and what followed it. For
    #: a backend from the pool: the settings it reports now, its key, ReadyForQuery.
    start: BackendSessionStart
    role: str
    #: The connection's raw socket: the session's end reads the backend's EOF on it (the
    #: relay engine takes the stream apart and sets the socket it kept here).
    sock: trio.socket.SocketType
    #: The session it was logged in for (None: not from a pooling source).
    request: BackendRequest | None = None
    #: When it logged in (``pool_max_lifetime`` counts from here).
    born: float = attrs.field(factory=trio.current_time)
    #: Its role's secret stops being valid then (``VALID UNTIL``, on trio's clock).
    role_valid_until: float = math.inf
    #: The source pools backends: the client gets a cancel key of its own, never this
    #: backend's real one (the next client of the backend must not be cancellable by it).
    pooling: bool = False
    #: It came from the pool (a previous session of the role used it).
    reused: bool = False

    @property
    def key(self) -> BackendKeyData | None:
        """The backend's process id and cancel secret (None: it sent no BackendKeyData)."""
        return self.start.key


Whois = Callable[[], Awaitable[Identity | Refusal]]


class BackendOrder(Protocol):
    """One connection's dealings with a :class:`BackendSource` (from ``BackendSource.order``,
    an async context manager: leaving it without an error means the session started)."""

    @property
    def role(self) -> str | None:
        """The role ``open`` logs in as, once known (reported also when the login fails)."""

    async def identify(self, whois: Whois) -> Identity | Refusal:
        """Run the peer's identity lookup; the source may prepare a backend meanwhile, but
        never logs in for, or keeps anything of, a peer the lookup refuses."""

    async def open(
        self, identity: Identity, grant: EffectiveGrant, log: EventLogger
    ) -> LoggedInBackend:
        """A backend logged in as the role of ``identity`` under ``grant`` for the request,
        provisioned if need be. Bounded by the caller's handshake deadline. Raises
        :class:`Refused` or :class:`ForwardBackendError` (the session's FATAL)."""


class BackendSource(Protocol):
    """Where one listener's sessions get their logged-in backends."""

    def order(
        self, peer_ip: str, request: BackendRequest
    ) -> AbstractAsyncContextManager[BackendOrder]:
        """One connection's order, for the handshake's length."""

    async def release(
        self, backend: LoggedInBackend, *, closed_by_backend: bool, ready_status: bytes | None
    ) -> BackendEnd:
        """The session is over (its relay ended; the client is being closed): take the
        backend back. ``closed_by_backend``: the backend closed the connection itself.
        ``ready_status``: the transaction status of the backend's last ReadyForQuery as the
        relay saw it (``I``, ``T``, ``E``), None when unknown. The caller shields this;
        bounded; never raises (except Cancelled)."""


#: How many peers, and for how long, count as recently served (their next connection's
#: backend is opened while they are being identified).
RECENT_PEERS: Final = 4096
RECENT_FOR: Final = 600.0
#: At most this many backend connections opened before admission, per peer at a time.
EARLY_PER_PEER: Final = 2


@attrs.define(eq=False)
class ConnectingSource:
    """A logged-in backend for every session, from the listener's configured backend: from
    the pool (``pool``, when the listener's ``pool`` is on) or a new login; ``release``
    keeps a backend whose session ended in step and idle (reset first), and ends the rest."""

    listener: ListenerConfig
    backend_ssl: ssl.SSLContext | None
    provisioner: Provisioner
    metrics: Metrics
    pbkdf2_limiter: trio.CapacityLimiter
    #: The app's pool of idle backends (None: no pooling).
    pool: BackendPool | None = attrs.field(default=None, kw_only=True)
    #: ``backend_end_timeout``: the bound on ending a backend.
    end_bound: float = attrs.field(kw_only=True)

    @property
    def pooling(self) -> bool:
        return self.pool is not None and self.listener.pool

    def recently_served(self, peer_ip: str) -> bool:
        """Whether ``peer_ip`` started a session on this listener in the last
        :data:`RECENT_FOR` seconds. Only such a peer's backend connection is opened before
        it is identified: a peer that was never granted, or a scan, makes the server fork
        nothing."""
        seen = self._recent.peek(peer_ip)
        return seen is not None and trio.current_time() - seen < RECENT_FOR

    def served(self, peer_ip: str) -> None:
        self._recent.put(peer_ip, trio.current_time())

    def early_turn(self, peer_ip: str) -> bool:
        """Take one of ``peer_ip``'s :data:`EARLY_PER_PEER` turns to open a backend connection
        before it is admitted (False: all are taken; the session connects once admitted).
        Whoever got one gives it back with :meth:`early_turn_done`."""
        taken = self._early_turns.get(peer_ip, 0)
        if taken >= EARLY_PER_PEER:
            return False
        self._early_turns[peer_ip] = taken + 1
        return True

    def early_turn_done(self, peer_ip: str) -> None:
        taken = self._early_turns.pop(peer_ip) - 1
        if taken:
            self._early_turns[peer_ip] = taken

    @contextlib.asynccontextmanager
    async def order(self, peer_ip: str, request: BackendRequest) -> AsyncIterator[BackendOrder]:
        order = _ConnectingOrder(self, request, peer_ip)
        try:
            yield order
        finally:
            await order.discard_early()

    def login_for(self, creds: Credentials, request: BackendRequest) -> BackendLogin:
        return BackendLogin(
            role=creds.role,
            secret=creds.secret,
            scram_keys=creds.scram_keys,
            database=request.database,
            parameters=dict(request.parameters),
            protocol=request.protocol,
            limiter=self.pbkdf2_limiter,
        )

    async def connect(self) -> BackendConnection:
        return await connect_backend(self.listener, self.backend_ssl)

    def may_have(self, request: BackendRequest) -> bool:
        """Whether the pool holds a backend for ``request`` on this listener, of any role, or
        one is being reset for it (a client that reconnects at once finds it there)."""
        pool = self.pool
        if pool is None:
            return False
        key = self.key_for("", request)
        return bool(self._resetting[key]) or pool.book.holds_any_role(key)

    def key_for(self, role: str, request: BackendRequest) -> PoolKey:
        return PoolKey(
            role,
            self.listener.name,
            self._server,
            request.database,
            request.protocol,
            request.key_parameters,
        )

    async def from_pool(
        self, role: str, request: BackendRequest, valid_until: datetime
    ) -> LoggedInBackend | RoleChanged | None:
        """A pooled backend of ``role`` for ``request`` that answers its check, or None (a
        miss). A pooled backend that fails its check is ended, and the next one tried.

        ``valid_until`` is the role's ``VALID UNTIL`` the caller's credentials were set or
        seen with: a backend whose role holds another one on the server now is not handed
        out (:mod:`waypoint.pool.wire`), and the role's pooled backends are closed
        (:class:`RoleChanged`)."""
        pool = self.pool
        assert pool is not None
        key = self.key_for(role, request)
        while (pooled := pool.take(key)) is not None:
            backend = pooled.backend
            assert isinstance(backend, LoggedInBackend)
            connection = backend.connection
            try:
                if not connection.tls:
                    # No round trip for a backend the server ended (over TLS, bytes may
                    # wait decrypted or in the TLS layer, out of the socket's sight).
                    pool_peek(backend.sock)
                answer = await pool_check(connection.stream, self.listener.pool_reset_timeout)
                reported = answer.parameters
            except PooledBackendFailed as exc:
                log.info("pooled_backend_failed_check", role=role, pid=pooled.pid, error=str(exc))
                self.metrics.pool_closed(self.listener.name, "check_failed")
                await self._end(backend, closed_by_backend=False)
                continue
            if answer.valid_until != valid_until:
                log.info("pooled_backend_role_changed", role=role, pid=pooled.pid)
                self.metrics.pool_closed(self.listener.name, "role_closed")
                await self._end(backend, closed_by_backend=False)
                pool.close_role(self.listener.backend_address, role, "role_closed")
                self.metrics.pool_taken(self.listener.name, hit=False)
                return RoleChanged(answer.valid_until)
            if reported:
                # The check saw settings change since the reset: the client is told those.
                start = backend.start
                params = updated_parameters(start.parameters, reported)
                backend.start = attrs.evolve(
                    start, raw=session_start(params, start.key), parameters=params
                )
            backend.reused = True
            self.metrics.pool_taken(self.listener.name, hit=True)
            return backend
        self.metrics.pool_taken(self.listener.name, hit=False)
        return None

    async def release(
        self, backend: LoggedInBackend, *, closed_by_backend: bool, ready_status: bytes | None
    ) -> BackendEnd:
        """Keep the backend when its session ended in step with it idle (``ready_status``
        ``I``) on a pooling listener, after a reset; end it otherwise."""
        if (
            ready_status == b"I"
            and not closed_by_backend
            and self.pooling
            and backend.request is not None
            and await self._keep(backend, backend.request)
        ):
            return BackendEnd("pooled")
        if self.pooling and not closed_by_backend:
            self.metrics.pool_closed(self.listener.name, "not_idle")
        return await self._end(backend, closed_by_backend=closed_by_backend)

    async def _keep(self, backend: LoggedInBackend, request: BackendRequest) -> bool:
        pool = self.pool
        assert pool is not None
        if not pool.open:
            return False
        listener = self.listener
        connection = backend.connection
        if not connection.tls:
            # The relay engine took the stream apart; the socket it kept is the connection.
            connection.socket_stream = connection.stream = trio.SocketStream(backend.sock)
        resetting = self.key_for("", request)
        self._resetting[resetting] += 1
        try:
            answer = await pool_reset(
                connection.stream, listener.pool_reset_query, listener.pool_reset_timeout
            )
        except PooledBackendFailed as exc:
            log.info("pool_reset_failed", role=backend.role, error=str(exc))
            self.metrics.pool_reset(listener.name, ok=False)
            self.metrics.pool_closed(listener.name, "reset_failed")
            return False
        finally:
            self._resetting[resetting] -= 1
            if not self._resetting[resetting]:
                del self._resetting[resetting]
        self.metrics.pool_reset(listener.name, ok=True)
        if answer.parameters or not backend.reused:
            # What the next client of this backend is sent, made now rather than during its
            # handshake (a backend back from the pool already holds it, unless the reset
            # changed a reported setting).
            start = backend.start
            params = updated_parameters(start.parameters, answer.parameters)
            backend.start = attrs.evolve(
                start, raw=session_start(params, start.key), parameters=params, leftover=b""
            )
        limits = PoolLimits(
            idle_timeout=listener.pool_idle_timeout,
            max_lifetime=listener.pool_max_lifetime,
            max_per_role=listener.pool_max_per_role,
            max_idle=await self._idle_cap(),
        )
        key = backend.key
        pooled = Pooled(
            backend,
            key.pid if key is not None else None,
            functools.partial(self._end, backend, closed_by_backend=False),
            backend.role_valid_until,
        )
        return pool.keep(
            self.key_for(backend.role, request), pooled, born=backend.born, limits=limits
        )

    async def _idle_cap(self) -> int:
        """``pool_max_idle`` as a count for this listener's server (its max_connections read
        once by the admin connection; 100 assumed, and logged, when it cannot be read)."""
        if self._max_connections is None:
            try:
                with trio.fail_after(5):
                    self._max_connections = await server_max_connections(self.provisioner.pools)
            except Exception as exc:
                log.warning("max_connections_unread", error=str(exc), assumed=100)
                return idle_cap(self.listener.pool_max_idle, 100)
        return idle_cap(self.listener.pool_max_idle, self._max_connections)

    _max_connections: int | None = attrs.field(default=None, init=False)
    #: The listener's backend server, (host, port).
    _server: tuple[str, int] = attrs.field(init=False)

    @_server.default
    def _backend_server(self) -> tuple[str, int]:
        return self.listener.backend_address

    #: Backends being reset before they are kept, by their key without the role.
    _resetting: collections.Counter[PoolKey] = attrs.field(factory=collections.Counter, init=False)
    #: Peers that started a session lately (address -> when, trio's clock). Looking a peer
    #: up does not count as using it: the peers forgotten first are the longest unserved.
    _recent: LRU[str, float] = attrs.field(factory=lambda: LRU(RECENT_PEERS), init=False)
    #: Per peer, its backend connections opened before admission and not yet taken or closed.
    _early_turns: dict[str, int] = attrs.field(factory=dict, init=False)

    async def _end(self, backend: LoggedInBackend, *, closed_by_backend: bool) -> BackendEnd:
        """End the backend on the server (:mod:`waypoint.proxy.backend_end`)."""
        key = backend.key
        cancel = terminate = None
        if key is not None:
            pid, secret = key.pid, key.secret

            async def cancel() -> None:
                # Waypoint's own cancel, to the configured backend (no rate limit or identity).
                await send_cancel(
                    self.listener.backend_address, pid, secret, self.listener, self.backend_ssl
                )

            async def terminate(wait: float) -> bool:
                return await terminate_pid(self.provisioner.pools, pid, backend.role, wait)

        try:
            return await stop_backend(
                backend.sock,
                closed_by_backend=closed_by_backend,
                send_cancel=cancel,
                terminate=terminate,
                bound=self.end_bound,
            )
        finally:
            backend.sock.close()
            with trio.move_on_after(1):
                await backend.connection.aclose()


@attrs.frozen
class RoleChanged:
    """A pooled backend's role holds another ``VALID UNTIL`` on the server than the caller's
    credentials were set or seen with: ``seen`` (None: none, or no such role)."""

    seen: datetime | None


@attrs.define(eq=False)
class _ConnectingOrder:
    source: ConnectingSource
    request: BackendRequest
    peer_ip: str
    role: str | None = None
    #: The backend connection opened during the lookup (TCP and TLS, no login), or why it
    #: could not be opened; None when none was opened (or it was taken).
    _early: BackendConnection | Exception | None = None
    #: Whether this order holds one of its peer's turns to open a backend before admission.
    _turn: bool = False

    async def identify(self, whois: Whois) -> Identity | Refusal:
        """Who the peer is; meanwhile, when this session will need a new backend (pooling
        off, or nothing pooled for the request) and the peer started a session here lately,
        its connection is opened: the connect and TLS overlap the lookup. Nothing is sent on
        it before the peer is known and granted; a refused peer's is abandoned at once (and
        closed by ``order``'s end). A peer not served lately opens nothing before it is
        identified and granted, and one served lately at most :data:`EARLY_PER_PEER` at a
        time: a burst of its connections, which may all be refused yet, makes the server
        fork no more processes than that before any is admitted."""
        source = self.source
        if (
            (source.pooling and source.may_have(self.request))
            or not source.recently_served(self.peer_ip)
            or not source.early_turn(self.peer_ip)
        ):
            return await whois()
        self._turn = True
        found: Identity | Refusal | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._connect_early)
            try:
                found = await whois()
            except Exception as exc:
                # Raised below as the lookup raised it (not in a group).
                failure = exc
            if failure is not None or isinstance(found, Refusal):
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        assert found is not None
        return found

    async def _connect_early(self) -> None:
        try:
            connection = await self.source.connect()
        except Exception as exc:
            # Raised by ``open``, where the connect would have raised it.
            self._early = exc
            return
        self._early = connection

    def _take_early(self) -> BackendConnection | None:
        """The connection opened during the lookup, once (None: none). Raises what the
        connect raised (:class:`BackendUnavailable`) when it could not be opened."""
        early, self._early = self._early, None
        self._give_back_turn()
        if isinstance(early, Exception):
            raise early
        return early

    async def discard_early(self) -> None:
        """Close the early connection if the session did not take it (refused, failed)."""
        early, self._early = self._early, None
        self._give_back_turn()
        if isinstance(early, BackendConnection):
            await early.aclose()

    def _give_back_turn(self) -> None:
        if self._turn:
            self._turn = False
            self.source.early_turn_done(self.peer_ip)

    async def open(
        self, identity: Identity, grant: EffectiveGrant, log: EventLogger
    ) -> LoggedInBackend:
        source = self.source
        listener = source.listener
        rotate = False
        while True:
            # The backend connection first: a backend that is down is 08006 "unavailable" (the
            # provisioner's admin connection would fail too, and say 58000 "provisioning
            # failed"); unless the pool holds a backend for this session of some role: then
            # the role first, whose backend may be waiting.
            connection: BackendConnection | None = None
            try:
                connection = self._take_early()
                if connection is None and (not source.pooling or not source.may_have(self.request)):
                    connection = await source.connect()
            except BackendUnavailable as exc:
                raise self._refusal(exc, log) from exc
            logged_in = False
            unconfirmed: datetime | None = None
            t0 = trio.current_time()
            try:
                async with source.provisioner.credentials(identity, grant, rotate=rotate) as creds:
                    if creds.provisioned:
                        source.metrics.provisioned(listener.name, trio.current_time() - t0)
                    self.role = creds.role
                    if source.pooling:
                        assert source.pool is not None
                        if creds.provisioned:
                            # A new role, a changed grant, a new secret: what was pooled
                            # under the old state goes first.
                            source.pool.close_role(
                                listener.backend_address, creds.role, "role_closed"
                            )
                            source.metrics.pool_taken(listener.name, hit=False)
                        elif connection is None:
                            found = await source.from_pool(
                                creds.role, self.request, creds.valid_until
                            )
                            if isinstance(found, LoggedInBackend):
                                logged_in = True
                                source.served(self.peer_ip)
                                return found
                            if found is not None:
                                # The role changed on the server since these credentials
                                # were set (another instance provisioned or extended it):
                                # the login tells which (28P01 after a provision).
                                unconfirmed = found.seen
                        else:
                            source.metrics.pool_taken(listener.name, hit=False)
                        if connection is None:
                            connection = await source.connect()
                    assert connection is not None
                    start = await login_backend(connection, source.login_for(creds, self.request))
                    logged_in = True
                    if unconfirmed is not None:
                        source.provisioner.adopt_valid_until(creds, unconfirmed)
                    source.served(self.peer_ip)
                    return LoggedInBackend(
                        connection,
                        start,
                        creds.role,
                        connection.socket_stream.socket,
                        request=self.request,
                        role_valid_until=_on_trio_clock(creds.valid_until),
                        pooling=source.pooling,
                    )
            except BackendError as exc:
                if exc.sqlstate == "28P01" and not rotate and not creds.provisioned:
                    # Another instance rotated the secret: provision once more.
                    log.info("backend_login_rotating", role=creds.role)
                    rotate = True
                    continue
                raise self._refusal(exc, log) from exc
            except (
                DatabaseMissing,
                ProvisionError,
                LoginError,
                ProtocolError,
                BackendUnavailable,
            ) as exc:
                if isinstance(exc, ProvisionError) and connection is None:
                    await self._down_first(exc, log)
                raise self._refusal(exc, log) from exc
            finally:
                if not logged_in and connection is not None:
                    await connection.aclose()

    async def _down_first(self, exc: ProvisionError, log: EventLogger) -> None:
        """A provision failed before this session opened a backend connection (the pool
        might have served it): a backend that is down is refused as 08006 "unavailable",
        as when the connection comes first, not as the admin connection's 58000."""
        try:
            probe = await self.source.connect()
        except BackendUnavailable as down:
            raise self._refusal(down, log) from exc
        await probe.aclose()

    def _refusal(self, exc: Exception, log: EventLogger) -> Refused | ForwardBackendError:
        """How a failure to provision, connect or log in ends the handshake (and is counted)."""
        source = self.source
        name = source.listener.name
        if isinstance(exc, DatabaseMissing):
            return ForwardBackendError(exc.fields)
        if isinstance(exc, ProvisionError):
            source.metrics.provision_failed(name)
            refusal = exc.refusal
            log.error("provision_failed", sqlstate=refusal.sqlstate, detail=refusal.detail)
            return Refused(refusal, cache=refusal.sqlstate != errors.PROVISIONING_FAILED)
        if isinstance(exc, BackendError):
            if exc.sqlstate != "28P01":
                return ForwardBackendError(exc.fields)
            source.metrics.backend_login_failed(name)
            detail = f"backend said 28P01 for role {self.role}"
            return Refused(errors.backend_login_failed(detail), cache=False)
        if isinstance(exc, LoginError | ProtocolError):
            source.metrics.backend_login_failed(name)
            return Refused(errors.backend_login_failed(str(exc)), cache=False)
        return Refused(errors.backend_unavailable(name, str(exc)), cache=False)


def _on_trio_clock(valid_until: datetime) -> float:
    """A wall-clock instant (``VALID UNTIL``) on trio's clock."""
    return trio.current_time() + (valid_until - datetime.now(UTC)).total_seconds()
