"""``waypoint.run(config)``: the root nursery wiring listeners, revalidation, the reaper, metrics,
graceful shutdown, and the configuration reload (SIGHUP) that changes listeners and settings
while sessions go on (docs/operations.md; applied by :mod:`waypoint.service.reloader`)."""

from __future__ import annotations

import functools
import resource
import signal
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

import attrs
import trio

from waypoint import errors
from waypoint.audit.service import AuditService, open_audit
from waypoint.config.model import Config, ListenerConfig, split_host_port
from waypoint.console.activity import backend_states
from waypoint.console.hub import ConsoleHub
from waypoint.identity import make_provider
from waypoint.identity.localapi import LocalAPIClient
from waypoint.identity.model import IdentityProvider
from waypoint.identity.tailscale import TailscaleProvider
from waypoint.observability.log import Format, current_format, get_logger
from waypoint.observability.metrics import Metrics
from waypoint.pool import BackendPool
from waypoint.provision.engine import Provisioner
from waypoint.proxy.admission import Admission
from waypoint.proxy.backend import backend_ssl_context
from waypoint.proxy.context import ListenerContext
from waypoint.proxy.listener import CurrentContext
from waypoint.proxy.registry import LiveSession, RefusalCache, SessionRegistry
from waypoint.proxy.relay import RelayEngine, open_relay_engine
from waypoint.proxy.revalidation import revalidation_loop
from waypoint.proxy.tls import MIN_VALIDITY, ClientTLS
from waypoint.reaper import service as reaper_service
from waypoint.service.health import Health, SupportsPing, backend_check, identity_check
from waypoint.service.listening import FINAL_GRACE, Listening, bind
from waypoint.service.notify import Notifier
from waypoint.service.reload import provisioner_inputs_equal
from waypoint.service.reloader import Reloader
from waypoint.state import open_state
from waypoint.state.base import StateStore

log = get_logger("app")


class StartupRefused(Exception):
    """The configuration loaded, but what it names on the server must not be used (a
    ``reassign_to`` role that could run callers' objects with privileges)."""


@attrs.define(eq=False)
class Running:
    """What ``task_status.started()`` reports: the bound addresses, and a handle to stop."""

    addresses: dict[str, list[tuple[str, int]]]
    metrics_address: tuple[str, int] | None
    metrics: Metrics
    registry: SessionRegistry
    #: Each listener's current context (a reload replaces entries in this very dict).
    contexts: dict[str, ListenerContext]
    _shutdown: trio.Event
    _immediate: trio.Event
    #: What ``/healthz`` and ``/readyz`` answer from.
    health: Health | None = attrs.field(default=None, kw_only=True)
    _service: _Service | None = attrs.field(default=None, kw_only=True)

    def shutdown(self, *, immediate: bool = False) -> None:
        """Begin a graceful drain (or end sessions at once with ``immediate``)."""
        self._shutdown.set()
        if immediate:
            self._immediate.set()

    def address(self, listener: str) -> tuple[str, int]:
        return self.addresses[listener][0]

    @property
    def config(self) -> Config:
        """The configuration in force (after the last successful reload)."""
        assert self._service is not None
        return self._service.config

    async def reload(self, config: Config | None = None) -> str:
        """Reload as SIGHUP does: re-read the file the running configuration came from (or
        apply ``config``, already loaded). Returns the outcome: ``applied``, ``invalid`` (the
        file did not validate), ``failed`` (it could not be applied) or ``skipped`` (a drain
        has begun); nothing changes unless ``applied``."""
        assert self._service is not None
        return await self._service.reloader.reload(config)


async def run(
    config: Config,
    *,
    handle_signals: bool = False,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run Waypoint until shutdown. Returns after a graceful drain (SIGINT/SIGTERM when
    ``handle_signals``, or :meth:`Running.shutdown`); SIGHUP (with ``handle_signals``) or
    :meth:`Running.reload` reloads the configuration. ``notifier`` tells the service manager
    (``waypoint run`` passes one reading ``NOTIFY_SOCKET``; by default nothing is sent)."""
    raise_nofile_limit()
    metrics = Metrics()
    notifier = notifier or Notifier({})
    health = Health(timeout=config.metrics.readiness_timeout, metrics=metrics)
    admission = Admission(config.admission, metrics)
    provider = make_provider(config.identity)
    service: _Service | None = None
    try:
        async with (
            open_state(config.state) as state,
            open_audit(
                config.audit,
                metrics=metrics,
                instance=getattr(state, "instance_id", None),
                log_error=_audit_error,
            ) as audit,
            open_relay_engine() as engine,
        ):
            service = _Service(
                config,
                metrics=metrics,
                health=health,
                notifier=notifier,
                admission=admission,
                provider=provider,
                state=state,
                engine=engine,
            )
            service.audit = audit
            for lst in config.listeners:
                service.contexts[lst.name] = service.build_context(config, lst, None)
            _add_health_checks(config, health, provider, state, service.contexts)
            await service.serve(handle_signals, task_status)
    finally:
        with trio.CancelScope(shield=True):
            if service is not None:
                await service.aclose()
            with trio.move_on_after(2):
                await provider.aclose()


class _Service:
    """The running service: its listeners, their contexts, the background tasks; its
    :class:`Reloader` changes them while sessions go on."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        health: Health,
        notifier: Notifier,
        admission: Admission,
        provider: IdentityProvider,
        state: StateStore,
        engine: RelayEngine,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.health = health
        self.notifier = notifier
        self.admission = admission
        self.provider = provider
        self.state = state
        self.engine = engine
        #: The statement audit (opened once at start: ``[audit]`` changes need a restart).
        self.audit: AuditService | None = None
        #: Idle backends of every listener (docs/architecture.md#backend-pooling).
        self.pool = BackendPool(metrics)
        self.registry = SessionRegistry()
        # The orphan sweep must not end the pooled backends this instance owns.
        self.registry.held_pids = self.pool.pids
        self.refusals = RefusalCache()
        #: The console (one per service, every listener's console database); its state
        #: probe reads the contexts current when it runs, so listeners a reload adds count.
        self.console = ConsoleHub.for_state(state, self.registry, probe=self._backend_states)
        self.admin_limiter = trio.CapacityLimiter(16)
        self.pbkdf2_limiter = trio.CapacityLimiter(2)
        self.contexts: dict[str, ListenerContext] = {}
        self.listening: dict[str, Listening] = {}
        #: Every provisioner not yet closed (current ones, and earlier ones live sessions use).
        self.provisioners: set[Provisioner] = set()
        self.shutdown = trio.Event()
        self.immediate = trio.Event()
        self._cert_client: LocalAPIClient | None = None
        self._own_cert_client = False
        self._sessions: trio.Nursery | None = None
        self._background: trio.Nursery | None = None
        self._revalidation = trio.CancelScope()
        self._reapers = trio.CancelScope()
        self._expiry: dict[Provisioner, trio.CancelScope] = {}
        self.running: Running | None = None
        #: The log format when ``[log] format`` is unset (``waypoint run --log-format``).
        self.log_format: Format = current_format()
        self.reloader = Reloader(self)

    # -- contexts ----------------------------------------------------------------------

    def _cert_source(self) -> LocalAPIClient:
        if self._cert_client is None:
            if isinstance(self.provider, TailscaleProvider):
                self._cert_client = self.provider.client
            else:
                ident = self.config.identity
                self._cert_client = LocalAPIClient(
                    ident.socket, timeout=max(ident.timeout, 30.0)
                )
                self._own_cert_client = True
        return self._cert_client

    def build_context(
        self,
        config: Config,
        lst: ListenerConfig,
        previous: ListenerContext | None,
        provider: IdentityProvider | None = None,
    ) -> ListenerContext:
        """A context for ``lst``; the provisioner of ``previous`` is kept when its backend and
        role settings are unchanged (its credential cache and admin pool go on). Raises
        (OSError, ssl.SSLError, ValueError) for TLS files that cannot be loaded."""
        fetch_cert: Callable[[str], Awaitable[tuple[bytes, bytes]]] | None = None
        cert_domains: Callable[[], Awaitable[tuple[str, ...]]] | None = None
        if lst.use_tailscale_tls:
            client = self._cert_source()

            async def fetch(domain: str) -> tuple[bytes, bytes]:
                return await client.cert_pair(domain, min_validity=MIN_VALIDITY)

            fetch_cert, cert_domains = fetch, client.cert_domains
        tls = ClientTLS(lst, fetch_cert=fetch_cert, cert_domains=cert_domains)
        backend_ssl = backend_ssl_context(lst)
        if previous is not None and provisioner_inputs_equal(
            previous.listener, lst, previous.config, config
        ):
            provisioner = previous.provisioner
        else:
            provisioner = Provisioner(
                lst, handshake_timeout=config.handshake_timeout, limiter=self.admin_limiter
            )
        self.provisioners.add(provisioner)
        return ListenerContext(
            config=config,
            listener=lst,
            identity=provider or self.provider,
            provisioner=provisioner,
            state=self.state,
            engine=self.engine,
            tls=tls,
            backend_ssl=backend_ssl,
            registry=self.registry,
            refusals=self.refusals,
            metrics=self.metrics,
            pbkdf2_limiter=self.pbkdf2_limiter,
            admission=self.admission,
            pool=self.pool,
            console=self.console,
            audit=self.audit,
        )

    def context_for(self, live: LiveSession) -> ListenerContext | None:
        """The context that revalidates ``live``: its listener's current settings (limits,
        preset caps, grants) with the provisioner of the backend the session is on; the
        accepting context itself when its listener was removed (it drains)."""
        owner = live.owner if isinstance(live.owner, ListenerContext) else None
        current = self.contexts.get(live.listener)
        if current is None:
            return owner
        if owner is None or owner.provisioner is current.provisioner:
            return current
        return attrs.evolve(current, provisioner=owner.provisioner)

    async def _backend_states(self, sessions: Sequence[LiveSession]) -> dict[str, str]:
        """The console's ``state`` column: each session's backend asked through the admin
        pool of the backend it is on (:meth:`context_for`, so after a reload too)."""
        return await backend_states(self.context_for, sessions)

    # -- serving -----------------------------------------------------------------------

    async def start_accepting(self, name: str, listening: Listening) -> None:
        assert self._sessions is not None
        await self._sessions.start(listening.accept, self._sessions)
        self.listening[name] = listening
        self.health.listener_accepting(name, listening.addresses)
        log.info(
            "listening",
            listener=name,
            addresses=listening.addresses,
            backend=listening.holder.current.listener.backend,
        )

    def _addresses(self) -> dict[str, list[tuple[str, int]]]:
        return {name: list(lst.addresses) for name, lst in self.listening.items()}

    def publish_addresses(self) -> None:
        if self.running is not None:
            self.running.addresses.clear()
            self.running.addresses.update(self._addresses())

    def start_background(self, fn: Callable[[], Awaitable[object]]) -> None:
        assert self._background is not None
        self._background.start_soon(fn)

    async def _run_background(
        self, *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as bg:
            self._background = bg
            bg.start_soon(self.admission.run)
            bg.start_soon(self.console.run)
            for provisioner in set(ctx.provisioner for ctx in self.contexts.values()):
                self.start_expiry(provisioner)
            self.restart_revalidation()
            self.restart_reapers()
            task_status.started(bg)
            await trio.sleep_forever()

    def start_expiry(self, provisioner: Provisioner) -> None:
        assert self._background is not None
        if provisioner in self._expiry:
            return
        scope = self._expiry[provisioner] = trio.CancelScope()

        async def expire() -> None:
            with scope:
                await provisioner.pools.expire_idle_forever()

        self._background.start_soon(expire)

    def stop_expiry(self, provisioner: Provisioner) -> None:
        scope = self._expiry.pop(provisioner, None)
        if scope is not None:
            scope.cancel()

    def restart_revalidation(self) -> None:
        assert self._background is not None
        self._revalidation.cancel()
        scope = self._revalidation = trio.CancelScope()
        interval = self.config.revalidation.interval

        async def revalidate() -> None:
            with scope:
                await revalidation_loop(
                    self.contexts, self.registry, interval, context_for=self.context_for
                )

        self._background.start_soon(revalidate)

    def restart_reapers(self) -> None:
        assert self._background is not None
        self._reapers.cancel()
        scope = self._reapers = trio.CancelScope()
        tasks = _extra_background(self.config, dict(self.contexts), self.registry, self.metrics)

        async def reapers() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    for start in tasks:
                        nursery.start_soon(start)

        self._background.start_soon(reapers)

    async def serve(self, handle_signals: bool, task_status: trio.TaskStatus[Running]) -> None:
        """Bind, start, serve until shutdown, drain."""
        async with trio.open_nursery() as root:
            await root.start(self.health.run)
            self.health.expect_listeners(list(self.contexts))
            # Sessions live in their own nursery so accepting can stop while they drain.
            async with trio.open_nursery() as sessions:
                self._sessions = sessions
                bound, metrics_address = await self._bind_all(root)
                await self._start_serving(
                    root, bound, metrics_address, handle_signals, task_status
                )
                await self.shutdown.wait()
                await self._drain()
                sessions.cancel_scope.cancel()
            root.cancel_scope.cancel()
        log.info("shutdown_complete")

    async def _bind_all(
        self, root: trio.Nursery
    ) -> tuple[dict[str, Listening], tuple[str, int] | None]:
        """Every listener bound (not accepting yet), the reassign targets checked, the metrics
        endpoint started (its address, if configured); on failure the sockets are closed."""
        bound: dict[str, Listening] = {}
        metrics_address: tuple[str, int] | None = None
        try:
            for name, ctx in self.contexts.items():
                bound[name] = await bind(CurrentContext(ctx), ctx)
            await self.refuse_unsafe_reassign(self.contexts)
            if self.config.metrics.listen:
                from waypoint.observability.metrics_server import serve_metrics

                mhost, mport = split_host_port(self.config.metrics.listen)
                metrics_address = await root.start(
                    functools.partial(serve_metrics, mhost, mport, self.metrics, health=self.health)
                )
        except BaseException:
            for listening in bound.values():
                await listening.discard()
            raise
        return bound, metrics_address

    async def refuse_unsafe_reassign(self, contexts: Mapping[str, ListenerContext]) -> None:
        """Raise :class:`StartupRefused` when a ``reassign_to`` of ``contexts`` could hand
        callers' objects to a privileged role (at start, and for what a reload adds or
        changes)."""
        problems = await reaper_service.reassign_target_problems(reap_targets(contexts))
        if problems:
            raise StartupRefused("; ".join(problems))

    async def _start_serving(
        self,
        root: trio.Nursery,
        bound: dict[str, Listening],
        metrics_address: tuple[str, int] | None,
        handle_signals: bool,
        task_status: trio.TaskStatus[Running],
    ) -> None:
        """The pool, the background tasks, signals and reloads, the orphan sweep; then every
        listener accepting, :class:`Running` reported and the service manager told."""
        await root.start(self.pool.run)
        await root.start(self._run_background)
        if handle_signals:
            root.start_soon(_signal_watcher, self.shutdown, self.immediate, self.reloader)
        root.start_soon(self.reloader.run_requested)
        # Before accepting: the backends a killed predecessor left behind end now.
        await _sweep_orphans(self.contexts, self.registry, self.metrics)
        for name, listening in bound.items():
            await self.start_accepting(name, listening)
        running = Running(
            self._addresses(),
            metrics_address,
            self.metrics,
            self.registry,
            self.contexts,
            self.shutdown,
            self.immediate,
            health=self.health,
            service=self,
        )
        self.running = running
        task_status.started(running)
        # Every listener is bound and accepting (and the metrics endpoint answers).
        self.notifier.ready(status=f"serving {len(self.contexts)} listener(s)")
        root.start_soon(self.notifier.watchdog_loop)

    async def _drain(self) -> None:
        """The graceful drain: readiness off, ``drain_delay``, listeners stopped, pooled
        backends closed, sessions given ``drain_timeout``, then ended."""
        registry = self.registry
        # No reload opens a listener while the drain runs.
        await self.reloader.close()
        config = self.config
        # Readiness goes first, so balancers polling /readyz move traffic before the
        # listeners stop accepting (``drain_delay`` gives them time to notice).
        self.health.begin_drain()
        self.notifier.stopping(status=f"draining {len(registry)} session(s)")
        log.info("shutdown_begin", sessions=len(registry), drain_timeout=config.drain_timeout)
        if config.drain_delay > 0 and not self.immediate.is_set():
            log.info("drain_delay", seconds=config.drain_delay)
            with trio.move_on_after(config.drain_delay):
                await self.immediate.wait()
        for name, listening in self.listening.items():
            listening.scope.cancel()
            self.health.listener_stopped(name)
        for ctx in self._all_contexts():
            ctx.accepting = False
        # Pooled backends go first; the sessions that end from now on keep nothing.
        await self.pool.close_all("shutdown")
        if not await self._sessions_ended(config.drain_timeout):
            # ``timeout``: drain_timeout ran out; ``immediate``: a second signal (or an
            # immediate shutdown) cut the wait short.
            reason = "immediate" if self.immediate.is_set() else "timeout"
            log.info("drain_deadline", sessions=len(registry), reason=reason)
            for live in registry:
                live.end(errors.shutting_down(), "drain_deadline")
            with trio.move_on_after(FINAL_GRACE):
                await registry.wait_empty()

    async def _sessions_ended(self, timeout: float) -> bool:
        """Wait up to ``timeout`` (less after :meth:`Running.shutdown` with ``immediate``) for
        every session to end; whether they did."""
        drained = False
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as waiter:

                async def _wait_drain() -> None:
                    await self.registry.wait_empty()
                    waiter.cancel_scope.cancel()

                async def _wait_immediate() -> None:
                    await self.immediate.wait()
                    waiter.cancel_scope.cancel()

                waiter.start_soon(_wait_drain)
                waiter.start_soon(_wait_immediate)
            drained = len(self.registry) == 0
        return drained

    def _all_contexts(self) -> list[ListenerContext]:
        """Current contexts, and earlier ones whose connections still run."""
        seen: dict[int, ListenerContext] = {id(ctx): ctx for ctx in self.contexts.values()}
        for holder in self.reloader.holders():
            for ctx in holder.contexts():
                seen[id(ctx)] = ctx
        return list(seen.values())

    async def aclose(self) -> None:
        """Close every provisioner (and a certificate client of our own); shielded by the
        caller."""
        for provisioner in list(self.provisioners):
            with trio.move_on_after(5):
                await provisioner.aclose()
        self.provisioners.clear()
        if self._own_cert_client and self._cert_client is not None:
            with trio.move_on_after(2):
                await self._cert_client.aclose()


def _add_health_checks(
    config: Config,
    health: Health,
    provider: object,
    state: object,
    contexts: dict[str, ListenerContext],
) -> None:
    """The readiness checks of this configuration (see :mod:`waypoint.service.health`)."""
    if isinstance(provider, TailscaleProvider):
        health.add_check("identity", identity_check(provider.client.get))
    for name, ctx in contexts.items():
        health.add_check(f"backend:{name}", backend_check(ctx.provisioner.pools))
    if config.state.backend == "redis" and isinstance(state, SupportsPing):
        health.add_check("redis", _ping_check(state))


def _ping_check(state: SupportsPing) -> Callable[[], Awaitable[str]]:
    async def check() -> str:
        await state.ping()
        return "PING answered"

    return check


def raise_nofile_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """Raise the soft open-file limit to the hard limit (each connection holds one or two
    descriptors; the usual soft limit of 1024 is reached long before memory). Returns the
    soft limit now in force."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        target = hard
    else:
        target = max(soft, hard)
    if target == soft:
        return soft
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("nofile_limit_unchanged", soft=soft, hard=hard, error=str(exc))
        return soft
    log.info("nofile_limit_raised", soft_was=soft, soft=target, hard=hard)
    return target


def _extra_background(
    config: Config,
    contexts: dict[str, ListenerContext],
    registry: SessionRegistry,
    metrics: Metrics,
) -> list[Callable[[], Awaitable[None]]]:
    """Background services beside revalidation: the reaper's periodic task per listener."""
    return reaper_service.reaper_tasks(config, reap_targets(contexts), registry, metrics)


async def _sweep_orphans(
    contexts: dict[str, ListenerContext], registry: SessionRegistry, metrics: Metrics
) -> None:
    """The reaper's start sweep of orphan backends."""
    await reaper_service.sweep_orphans_at_start(reap_targets(contexts), registry, metrics)


def reap_targets(contexts: Mapping[str, ListenerContext]) -> dict[str, reaper_service.ReapTarget]:
    """Each listener as the reaper sees it (plain values: the reaper knows no proxy types)."""
    return {
        name: reaper_service.ReapTarget(
            listener=ctx.listener,
            provisioner=ctx.provisioner,
            state=ctx.state,
            shared_state=ctx.config.state.backend != "memory",
            release_idle=None if ctx.pool is None else _release_idle(ctx.pool, ctx.listener),
        )
        for name, ctx in contexts.items()
    }


def _release_idle(
    pool: BackendPool, listener: ListenerConfig
) -> Callable[[Collection[str]], Awaitable[int]]:
    """The reaper's way to end this instance's pooled backends of expired roles (and wait
    until they are gone) before it decides whether a role is still in use."""

    async def release(roles: Collection[str]) -> int:
        return await pool.close_roles_now(listener.backend_address, roles, "role_closed")

    return release


async def _signal_watcher(shutdown: trio.Event, immediate: trio.Event, reloader: Reloader) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            if signum == signal.SIGHUP:
                # The reload signal (systemd's ExecReload, ``waypoint reload``): signals that
                # arrive while a reload runs make one more reload after it.
                log.info("signal", signal="SIGHUP", note="reloading the configuration")
                reloader.request()
                continue
            count += 1
            log.info("signal", signal=signal.Signals(signum).name, count=count)
            shutdown.set()
            if count >= 2:
                immediate.set()


def _audit_error(message: str) -> None:
    """A failed write to the audit sink (it is retried; sessions wait or close)."""
    log.error("audit_sink_failed", error=message)
