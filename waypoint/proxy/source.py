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

The source here, :class:`ConnectingSource`, opens a new backend for every session, and
overlaps what it can with the identity lookup: a peer whose last handshake succeeded gets its
backend connection (and, for the same session as last time with credentials the provisioner
holds, its login) made during the whois (:class:`BackendPrefetch`, ``registry.WarmPeers``,
``registry.LoginGuess``).
"""

from __future__ import annotations

import contextlib
import hmac
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import attrs
import trio

from waypoint import errors
from waypoint.config.model import ListenerConfig
from waypoint.errors import Refusal
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.observability.log import EventLogger
from waypoint.observability.metrics import Metrics
from waypoint.pgwire import BackendError, BackendKeyData, LoginError, ProtocolError
from waypoint.provision.backends import terminate_pid
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
from waypoint.proxy.registry import LoginGuess, WarmPeers


@attrs.frozen
class BackendRequest:
    """The backend session a client asked for, as Waypoint will ask the backend for it."""

    database: str
    #: The client's startup parameters that go to the backend (not ``user``, ``database``,
    #: ``replication``, ``_pq_.*`` or Waypoint's own preset cap).
    parameters: Mapping[str, str]
    #: The protocol version asked of the backend: the client's, up to the newest Waypoint speaks.
    protocol: tuple[int, int]


@attrs.define(eq=False)
class LoggedInBackend:
    """A backend connection logged in as a session's role, ready for its first query."""

    connection: BackendConnection
    #: What the backend said from AuthenticationOk to ReadyForQuery (ParameterStatus,
    #: BackendKeyData, notices), forwarded verbatim to the client, and what followed it.
    start: BackendSessionStart
    role: str
    #: The connection's raw socket: the session's end reads the backend's EOF on it (the
    #: relay engine takes the stream apart and sets the socket it kept here).
    sock: trio.socket.SocketType

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


@attrs.define(eq=False)
class ConnectingSource:
    """A new backend for every session, from the listener's configured backend, with the
    warm-peer prefetch (see the module docstring); ``release`` ends it."""

    listener: ListenerConfig
    backend_ssl: ssl.SSLContext | None
    provisioner: Provisioner
    metrics: Metrics
    pbkdf2_limiter: trio.CapacityLimiter
    warm_peers: WarmPeers
    #: ``backend_end_timeout``: the bound on ending a backend.
    end_bound: float = attrs.field(kw_only=True)

    @contextlib.asynccontextmanager
    async def order(self, peer_ip: str, request: BackendRequest) -> AsyncIterator[BackendOrder]:
        order = _ConnectingOrder(self, request, self._plan_prefetch(peer_ip, request))
        started = False
        try:
            yield order
            started = True
            if order.guess is not None:
                self.warm_peers.mark(peer_ip, order.guess)
        finally:
            if not started:
                self.warm_peers.forget(peer_ip)
            if order.prefetch is not None:
                await order.prefetch.aclose()

    def _plan_prefetch(self, peer_ip: str, request: BackendRequest) -> BackendPrefetch | None:
        """For a warm peer, the backend connection to open during its whois; logged in as its
        last role when it asks for the same session and that role's credentials are cached."""
        if not self.warm_peers.is_warm(peer_ip):
            return None
        guess = self.warm_peers.guess(peer_ip)
        login = None
        if guess is not None and guess.same_session(
            request.database, request.parameters, request.protocol
        ):
            creds = self.provisioner.peek(guess.role, guess.owner)
            if creds is not None:
                login = self.login_for(creds, request)
        return BackendPrefetch(self.listener, self.backend_ssl, self.metrics, login)

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

    async def release(
        self, backend: LoggedInBackend, *, closed_by_backend: bool, ready_status: bytes | None
    ) -> BackendEnd:
        """End the backend (whatever ``ready_status``: this source keeps nothing)."""
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


@attrs.define(eq=False)
class _ConnectingOrder:
    source: ConnectingSource
    request: BackendRequest
    prefetch: BackendPrefetch | None
    role: str | None = None
    #: What the peer's next connection may log in as early (set once a backend is open).
    guess: LoginGuess | None = None

    async def identify(self, whois: Whois) -> Identity | Refusal:
        """Who the peer is; with a prefetch, its backend connection opens meanwhile."""
        prefetch = self.prefetch
        if prefetch is None:
            return await whois()
        answer: Identity | Refusal
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetch.run)
            answer = await whois()
            if isinstance(answer, Refusal):
                nursery.cancel_scope.cancel()  # no backend connection for a refused peer
        return answer

    async def open(
        self, identity: Identity, grant: EffectiveGrant, log: EventLogger
    ) -> LoggedInBackend:
        connection, start, role = await self._provision_and_login(identity, grant, log)
        owner = self.source.provisioner.owner_of(identity, grant)
        request = self.request
        self.guess = LoginGuess.of(
            role, request.database, request.parameters, request.protocol, owner
        )
        return LoggedInBackend(connection, start, role, connection.socket_stream.socket)

    async def _provision_and_login(
        self, identity: Identity, grant: EffectiveGrant, log: EventLogger
    ) -> tuple[BackendConnection, BackendSessionStart, str]:
        source = self.source
        prefetch = self.prefetch
        rotate = False
        while True:
            # The backend connection first: a backend that is down is 08006 "unavailable" (the
            # provisioner's admin connection would fail too, and say 58000 "provisioning
            # failed"). A session the prefetch logged in already is taken below if the
            # credentials match.
            backend: BackendConnection | None = None
            try:
                if prefetch is not None and prefetch.available:
                    backend = prefetch.take()
                elif prefetch is None or not prefetch.logged_in or rotate:
                    backend = await source.connect()
            except BackendUnavailable as exc:
                raise self._refusal(exc, log) from exc
            logged_in = False
            t0 = trio.current_time()
            try:
                async with source.provisioner.credentials(identity, grant, rotate=rotate) as creds:
                    if creds.provisioned:
                        source.metrics.provisioned(source.listener.name, trio.current_time() - t0)
                    self.role = creds.role
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
                        backend = await source.connect()
                    start = await login_backend(backend, source.login_for(creds, self.request))
                    logged_in = True
                    return backend, start, creds.role
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
                raise self._refusal(exc, log) from exc
            finally:
                if not logged_in and backend is not None:
                    await backend.aclose()

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


class BackendPrefetch:
    """A backend connection opened ahead of need: for a warm peer, while its identity is
    looked up (``BackendOrder.identify``), and, with a :class:`BackendLogin`, logged in too.

    Without a login, ``run`` never raises BackendUnavailable: the failure is kept and raised
    by ``take``, where the connection would have been opened without a prefetch. With one,
    the connection is only ever handed out logged in, by ``take_session`` to a caller whose
    credentials are the very role and secret it logged in with; a login that fails for any
    reason is dropped quietly (the caller connects as without a prefetch). ``aclose`` closes
    a connection nobody took (a refusal, another role, a rotation that reconnects).
    """

    def __init__(
        self,
        listener: ListenerConfig,
        ssl_context: ssl.SSLContext | None,
        metrics: Metrics,
        login: BackendLogin | None = None,
    ) -> None:
        self._listener = listener
        self._ssl_context = ssl_context
        self._metrics = metrics
        self._login = login
        self._done = trio.Event()
        self._backend: BackendConnection | None = None
        self._start: BackendSessionStart | None = None
        self._failure: BackendUnavailable | None = None
        self._taken = False

    async def run(self) -> None:
        try:
            self._backend = await connect_backend(self._listener, self._ssl_context)
            if self._login is not None:
                self._start = await self._log_in(self._backend, self._login)
                if self._start is None:
                    await self.aclose()  # counted: logged_in, discarded
        except BackendUnavailable as exc:
            self._failure = exc
        finally:
            self._done.set()

    async def _log_in(
        self, backend: BackendConnection, login: BackendLogin
    ) -> BackendSessionStart | None:
        try:
            return await login_backend(backend, login)
        except (BackendError, LoginError, ProtocolError, BackendUnavailable):
            # A role dropped or rotated meanwhile, a backend gone: the real login will say.
            return None

    @property
    def logged_in(self) -> bool:
        """The planned login succeeded and the session is not taken yet."""
        return not self._taken and self._start is not None and self._backend is not None

    @property
    def available(self) -> bool:
        """A plain connection (no login planned), not taken yet, and the attempt finished
        (the whois waited for it)."""
        return self._login is None and not self._taken and self._done.is_set()

    def take(self) -> BackendConnection:
        """The connection (once), or the attempt's BackendUnavailable."""
        assert self.available
        self._taken = True
        self._metrics.backend_prefetched(self._listener.name, logged_in=False, used=True)
        if self._failure is not None:
            raise self._failure
        assert self._backend is not None
        backend, self._backend = self._backend, None
        return backend

    def take_session(
        self, role: str, secret: str
    ) -> tuple[BackendConnection, BackendSessionStart] | None:
        """The logged-in session (once) if it was made as ``role`` with ``secret``."""
        login, start, backend = self._login, self._start, self._backend
        if (
            self._taken
            or login is None
            or start is None
            or backend is None
            or login.role != role
            or not hmac.compare_digest(login.secret.encode(), secret.encode())
        ):
            return None
        self._taken = True
        self._backend = None
        self._metrics.backend_prefetched(self._listener.name, logged_in=True, used=True)
        return backend, start

    async def aclose(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            logged_in = self._login is not None
            self._metrics.backend_prefetched(self._listener.name, logged_in=logged_in, used=False)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await backend.aclose()
