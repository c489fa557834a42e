"""``waypoint.run(config)``: the root nursery wiring listeners, revalidation, the reaper, metrics,
and graceful shutdown (SPEC §11)."""

from __future__ import annotations

import functools
import resource
import signal
from collections.abc import Awaitable, Callable

import attrs
import trio

from waypoint import errors
from waypoint.config.model import Config, split_host_port
from waypoint.identity import make_provider
from waypoint.identity.localapi import LocalAPIClient
from waypoint.identity.tailscale import TailscaleProvider
from waypoint.observability.log import get_logger
from waypoint.observability.metrics import Metrics
from waypoint.provision.engine import Provisioner
from waypoint.proxy.admission import Admission
from waypoint.proxy.backend import backend_ssl_context
from waypoint.proxy.listener import accept_loop, open_listener
from waypoint.proxy.registry import RefusalCache, SessionRegistry
from waypoint.proxy.relay import open_relay_engine
from waypoint.proxy.revalidation import revalidation_loop
from waypoint.proxy.session import ListenerContext
from waypoint.proxy.tls import MIN_VALIDITY, ClientTLS
from waypoint.reaper import service as reaper_service
from waypoint.service.health import Health, SupportsPing, backend_check, identity_check
from waypoint.service.notify import Notifier
from waypoint.state import open_state

log = get_logger("app")

# After the drain deadline, sessions get their FATAL; this long to go before they are cut.
FINAL_GRACE = 5.0


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
    contexts: dict[str, ListenerContext]
    _shutdown: trio.Event
    _immediate: trio.Event
    #: What ``/healthz`` and ``/readyz`` answer from.
    health: Health | None = attrs.field(default=None, kw_only=True)

    def shutdown(self, *, immediate: bool = False) -> None:
        """Begin a graceful drain (or end sessions at once with ``immediate``)."""
        self._shutdown.set()
        if immediate:
            self._immediate.set()

    def address(self, listener: str) -> tuple[str, int]:
        return self.addresses[listener][0]


async def run(
    config: Config,
    *,
    handle_signals: bool = False,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run Waypoint until shutdown. Returns after a graceful drain (SIGINT/SIGTERM when
    ``handle_signals``, or :meth:`Running.shutdown`). ``notifier`` tells the service manager
    (``waypoint run`` passes one reading ``NOTIFY_SOCKET``; by default nothing is sent)."""
    raise_nofile_limit()
    metrics = Metrics()
    notifier = notifier or Notifier({})
    health = Health(timeout=config.metrics.readiness_timeout, metrics=metrics)
    admission = Admission(config.admission, metrics)
    registry = SessionRegistry()
    shutdown = trio.Event()
    immediate = trio.Event()
    provider = make_provider(config.identity)
    cert_client: LocalAPIClient | None = None
    if any(lst.use_tailscale_tls for lst in config.listeners):
        if isinstance(provider, TailscaleProvider):
            cert_client = provider.client
        else:
            cert_client = LocalAPIClient(
                config.identity.socket, timeout=max(config.identity.timeout, 30.0)
            )

    async def fetch_cert(domain: str) -> tuple[bytes, bytes]:
        assert cert_client is not None
        return await cert_client.cert_pair(domain, min_validity=MIN_VALIDITY)

    async def cert_domains() -> tuple[str, ...]:
        assert cert_client is not None
        return await cert_client.cert_domains()

    admin_limiter = trio.CapacityLimiter(16)
    pbkdf2_limiter = trio.CapacityLimiter(2)
    contexts: dict[str, ListenerContext] = {}
    try:
        async with open_state(config.state) as state, open_relay_engine() as engine:
            refusals = RefusalCache()
            for lst in config.listeners:
                contexts[lst.name] = ListenerContext(
                    config=config,
                    listener=lst,
                    identity=provider,
                    provisioner=Provisioner(
                        lst, handshake_timeout=config.handshake_timeout, limiter=admin_limiter
                    ),
                    state=state,
                    engine=engine,
                    tls=ClientTLS(
                        lst,
                        fetch_cert=fetch_cert if cert_client else None,
                        cert_domains=cert_domains if cert_client else None,
                    ),
                    backend_ssl=backend_ssl_context(lst),
                    registry=registry,
                    refusals=refusals,
                    metrics=metrics,
                    pbkdf2_limiter=pbkdf2_limiter,
                    admission=admission,
                )
            _add_health_checks(config, health, provider, state, contexts)
            try:
                await _serve(
                    config,
                    admission,
                    contexts,
                    registry,
                    metrics,
                    shutdown,
                    immediate,
                    handle_signals,
                    health,
                    notifier,
                    task_status,
                )
            finally:
                with trio.CancelScope(shield=True):
                    for ctx in contexts.values():
                        with trio.move_on_after(5):
                            await ctx.provisioner.aclose()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await provider.aclose()


async def _serve(
    config: Config,
    admission: Admission,
    contexts: dict[str, ListenerContext],
    registry: SessionRegistry,
    metrics: Metrics,
    shutdown: trio.Event,
    immediate: trio.Event,
    handle_signals: bool,
    health: Health,
    notifier: Notifier,
    task_status: trio.TaskStatus[Running],
) -> None:
    async with trio.open_nursery() as root:
        await root.start(health.run)
        health.expect_listeners(list(contexts))
        # Sessions live in their own nursery so accepting can stop while they drain.
        async with trio.open_nursery() as sessions:
            accept_scope = trio.CancelScope()
            addresses: dict[str, list[tuple[str, int]]] = {}
            sockets: list[tuple[ListenerContext, trio.SocketListener]] = []
            for name, ctx in contexts.items():
                listeners = await open_listener(ctx)
                addresses[name] = []
                for sl in listeners:
                    sockname = sl.socket.getsockname()
                    addresses[name].append((str(sockname[0]), int(sockname[1])))
                    sockets.append((ctx, sl))
                log.info(
                    "listening",
                    listener=name,
                    addresses=addresses[name],
                    backend=ctx.listener.backend,
                )

            metrics_address: tuple[str, int] | None = None
            if config.metrics.listen:
                from waypoint.observability.metrics_server import serve_metrics

                mhost, mport = split_host_port(config.metrics.listen)
                metrics_address = await root.start(
                    functools.partial(serve_metrics, mhost, mport, metrics, health=health)
                )

            background = trio.CancelScope()

            async def run_background() -> None:
                with background:
                    async with trio.open_nursery() as bg:
                        bg.start_soon(
                            revalidation_loop, contexts, registry, config.revalidation.interval
                        )
                        for ctx in contexts.values():
                            bg.start_soon(ctx.provisioner.pools.expire_idle_forever)
                        bg.start_soon(admission.run)
                        for start in _extra_background(config, contexts, registry, metrics):
                            bg.start_soon(start)
                        await trio.sleep_forever()

            root.start_soon(run_background)
            if handle_signals:
                root.start_soon(_signal_watcher, shutdown, immediate)

            async def accepting(
                ctx: ListenerContext,
                sl: trio.SocketListener,
                *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                task_status.started()
                await accept_loop(ctx, sl, sessions)

            async def run_accept(*, task_status: trio.TaskStatus[None]) -> None:
                with accept_scope:
                    async with trio.open_nursery() as acc:
                        for ctx, sl in sockets:
                            await acc.start(accepting, ctx, sl)
                        for name in contexts:
                            health.listener_accepting(name, addresses[name])
                        task_status.started()
                for name in contexts:
                    health.listener_stopped(name)
                for _, sl in sockets:
                    with trio.CancelScope(shield=True):
                        await sl.aclose()

            # Before accepting: a reassign_to that could hand callers' objects to a
            # privileged role refuses the start; the backends a killed predecessor left
            # behind end now.
            problems = await reaper_service.reassign_target_problems(contexts)
            if problems:
                raise StartupRefused("; ".join(problems))
            await _sweep_orphans(contexts, registry, metrics)
            await sessions.start(run_accept)
            task_status.started(
                Running(
                    addresses,
                    metrics_address,
                    metrics,
                    registry,
                    contexts,
                    shutdown,
                    immediate,
                    health=health,
                )
            )
            # Every listener is bound and accepting (and the metrics endpoint answers).
            notifier.ready(status=f"serving {len(contexts)} listener(s)")
            root.start_soon(notifier.watchdog_loop)

            await shutdown.wait()
            # Readiness goes first, so balancers polling /readyz move traffic before the
            # listeners stop accepting (``drain_delay`` gives them time to notice).
            health.begin_drain()
            notifier.stopping(status=f"draining {len(registry)} session(s)")
            log.info("shutdown_begin", sessions=len(registry), drain_timeout=config.drain_timeout)
            if config.drain_delay > 0 and not immediate.is_set():
                log.info("drain_delay", seconds=config.drain_delay)
                with trio.move_on_after(config.drain_delay):
                    await immediate.wait()
            accept_scope.cancel()
            for ctx in contexts.values():
                ctx.accepting = False
            drained = False
            with trio.move_on_after(config.drain_timeout):
                async with trio.open_nursery() as waiter:

                    async def _wait_drain() -> None:
                        await registry.wait_empty()
                        waiter.cancel_scope.cancel()

                    async def _wait_immediate() -> None:
                        await immediate.wait()
                        waiter.cancel_scope.cancel()

                    waiter.start_soon(_wait_drain)
                    waiter.start_soon(_wait_immediate)
                drained = len(registry) == 0
            if not drained:
                log.info("drain_deadline", sessions=len(registry))
                for live in registry:
                    live.end(errors.shutting_down(), "drain_deadline")
                with trio.move_on_after(FINAL_GRACE):
                    await registry.wait_empty()
            sessions.cancel_scope.cancel()
        background.cancel()
        root.cancel_scope.cancel()
    log.info("shutdown_complete")


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
    return reaper_service.reaper_tasks(config, contexts, registry, metrics)


async def _sweep_orphans(
    contexts: dict[str, ListenerContext], registry: SessionRegistry, metrics: Metrics
) -> None:
    """The reaper's start sweep of orphan backends."""
    await reaper_service.sweep_orphans_at_start(contexts, registry, metrics)


async def _signal_watcher(shutdown: trio.Event, immediate: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            if signum == signal.SIGHUP:
                # The reload signal (systemd's ExecReload): this version does not re-read its
                # configuration, and a SIGHUP must not end the process as its default would.
                log.warning(
                    "sighup_ignored", note="the configuration is not reloaded; restart to apply"
                )
                continue
            count += 1
            log.info("signal", signal=signal.Signals(signum).name, count=count)
            shutdown.set()
            if count >= 2:
                immediate.set()
