"""Applying a configuration reload to the running service while sessions go on: the file read
again, the difference planned (:mod:`waypoint.service.reload`), everything that can fail
staged first (the new contexts, TLS files, bound addresses, the reassign targets), then
committed in steps that cannot fail: each listener's :class:`CurrentContext` swapped, added
listeners accepting, rebound ones moved to their new sockets, removed ones stopped and
drained, and the provisioners no context uses any more closed once their sessions end.

The service is seen through :class:`Service`, the part of it a reload reads and changes; the
service keeps its serving and lifecycle (binding at start, the background tasks, the
shutdown drain) to itself.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import attrs
import trio

from waypoint import errors
from waypoint.config.load import ConfigError, load_config
from waypoint.config.model import Config, ListenerConfig
from waypoint.identity import make_provider
from waypoint.identity.model import IdentityProvider
from waypoint.observability.log import LEVELS, Format, get_logger, switch
from waypoint.observability.metrics import Metrics
from waypoint.pool import BackendPool
from waypoint.provision.engine import Provisioner
from waypoint.proxy.context import ListenerContext
from waypoint.proxy.listener import CurrentContext
from waypoint.proxy.registry import SessionRegistry
from waypoint.service.health import Health, backend_check
from waypoint.service.listening import FINAL_GRACE, Listening, bind
from waypoint.service.notify import Notifier
from waypoint.service.reload import Plan, config_hash, plan_reload

__all__ = ["Reloader", "Service"]

# The reload's events keep the logger of the service they change.
log = get_logger("app")


class Service(Protocol):
    """What a reload reads and changes of the running service."""

    #: The configuration in force; a reload replaces it.
    config: Config
    #: The identity provider new contexts use (a changed static table replaces it).
    provider: IdentityProvider
    #: The log format when ``[log] format`` is unset.
    log_format: Format
    #: Each listener's current context (a reload adds, replaces and removes entries).
    contexts: dict[str, ListenerContext]
    #: The listeners accepting now.
    listening: dict[str, Listening]
    #: Every provisioner not yet closed (current ones, and earlier ones live sessions use).
    provisioners: set[Provisioner]
    registry: SessionRegistry
    metrics: Metrics
    notifier: Notifier
    health: Health
    pool: BackendPool
    #: Set once the service drains: no reload runs from then on.
    shutdown: trio.Event

    def build_context(
        self,
        config: Config,
        lst: ListenerConfig,
        previous: ListenerContext | None,
        provider: IdentityProvider | None = None,
    ) -> ListenerContext:
        """A new context for ``lst`` (keeping ``previous``'s provisioner when it can serve);
        the provisioner is added to :attr:`provisioners`. Raises for TLS files that cannot
        be loaded."""
        ...

    async def refuse_unsafe_reassign(self, contexts: Mapping[str, ListenerContext]) -> None:
        """Raise when a ``reassign_to`` of these contexts must not be used."""
        ...

    async def start_accepting(self, name: str, listening: Listening) -> None:
        """Accept on ``listening`` as the listener ``name`` (entered in :attr:`listening`)."""
        ...

    def start_background(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` as a task of the service's background nursery."""
        ...

    def start_expiry(self, provisioner: Provisioner) -> None:
        """Expire the idle admin sessions of ``provisioner`` (once per provisioner)."""
        ...

    def stop_expiry(self, provisioner: Provisioner) -> None:
        """End what :meth:`start_expiry` started."""
        ...

    def restart_revalidation(self) -> None:
        """Revalidate the sessions at the interval of :attr:`config`, from now on."""
        ...

    def restart_reapers(self) -> None:
        """Run the reaper of each listener of :attr:`contexts`, from now on."""
        ...

    def publish_addresses(self) -> None:
        """Tell the handle of the running service the addresses of :attr:`listening`."""
        ...


@attrs.define(eq=False)
class _Staged:
    """A reload's new contexts and newly bound listeners, before they serve."""

    contexts: dict[str, ListenerContext] = attrs.field(factory=dict)
    bound: dict[str, Listening] = attrs.field(factory=dict)
    #: A new identity provider (a changed static table), or None to keep the running one.
    provider: IdentityProvider | None = None


class Reloader:
    """The reloads of one running service, one at a time: those SIGHUP asks for
    (:meth:`request`) and those called (:meth:`reload`). Also keeps the listeners a reload
    removed while their sessions drain (:meth:`holders`)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._lock = trio.Lock()
        self._requested = trio.Event()
        #: Removed listeners whose sessions still run.
        self._draining: list[CurrentContext] = []
        self._hash = config_hash(service.config)
        service.metrics.config_loaded(self._hash)

    def request(self) -> None:
        """Ask :meth:`run_requested` for a reload; requests made while one runs make one more
        reload after it (not one each)."""
        self._requested.set()

    async def run_requested(self) -> None:
        """Run the reloads :meth:`request` asks for, one at a time, forever."""
        while True:
            await self._requested.wait()
            self._requested = trio.Event()
            await self.reload(None)

    async def close(self) -> None:
        """Wait for a reload that runs, and let no other start (the service drains)."""
        await self._lock.acquire()

    def holders(self) -> list[CurrentContext]:
        """Every listener's holder: those accepting, and those a reload removed whose sessions
        still drain."""
        return [lst.holder for lst in self._service.listening.values()] + self._draining

    async def reload(self, loaded: Config | None) -> str:
        """Re-read the file the running configuration came from (or apply ``loaded``). Returns
        ``applied``, ``invalid``, ``failed`` or ``skipped`` (the service drains); nothing
        changes unless ``applied``, and nothing that goes wrong ends the service."""
        svc = self._service
        if svc.shutdown.is_set():
            log.warning("config_reload_skipped", reason="shutting down")
            return "skipped"
        async with self._lock:
            if svc.shutdown.is_set():
                return "skipped"
            source = svc.config.source
            svc.notifier.reloading(status=f"reloading {source or 'the configuration'}")
            try:
                outcome, status = await self._reload(loaded)
            except Exception as exc:
                # A reload never ends the service, whatever went wrong.
                log.error(
                    "config_reload_failed",
                    exc_info=True,
                    file=source,
                    error=f"{type(exc).__name__}: {exc}",
                )
                outcome, status = "failed", f"serving {len(svc.contexts)} listener(s)"
            svc.metrics.config_reloaded(outcome)
            svc.notifier.ready(status=status)
            return outcome

    async def _reload(self, loaded: Config | None) -> tuple[str, str]:
        svc = self._service
        source = svc.config.source
        serving = f"serving {len(svc.contexts)} listener(s)"
        if loaded is None:
            if source is None:
                log.error("config_reload_failed", reason="the configuration came from no file")
                return "failed", serving + "; reload failed"
            try:
                loaded = await trio.to_thread.run_sync(load_config, source)
            except ConfigError as exc:
                log.error(
                    "config_reload_invalid",
                    file=source,
                    problems=len(exc.problems),
                    error=str(exc),
                    note="nothing changed; the previous configuration still serves",
                )
                return "invalid", serving + "; the reloaded configuration is not valid"
        plan = plan_reload(svc.config, loaded)
        new_hash = await trio.to_thread.run_sync(config_hash, loaded)
        try:
            staged = await self._stage(plan)
        except Exception as exc:
            log.error(
                "config_reload_failed",
                file=source,
                error=f"{type(exc).__name__}: {exc}",
                note="nothing changed; the previous configuration still serves",
            )
            return "failed", serving + "; reload failed"
        await self._commit(plan, staged)
        svc.metrics.config_loaded(new_hash, previous=self._hash)
        self._hash = new_hash
        log.info(
            "config_reloaded",
            file=source,
            hash=new_hash,
            added=list(plan.added),
            removed=list(plan.removed),
            changed=list(plan.changed),
            settings=list(plan.settings),
            kept_until_restart=list(plan.kept),
            sessions=len(svc.registry),
        )
        return "applied", f"serving {len(svc.contexts)} listener(s)"

    async def _stage(self, plan: Plan) -> _Staged:
        """Everything that can fail, before anything changes: the new contexts (TLS files
        load), the new sockets (addresses bind). On failure, what was made is undone."""
        svc = self._service
        config = plan.config
        staged = _Staged()
        if config.identity != svc.config.identity:
            # Only the static provider's table changes live (plan_reload keeps the rest).
            staged.provider = make_provider(config.identity)
        before = set(svc.provisioners)
        try:
            for lst in config.listeners:
                staged.contexts[lst.name] = svc.build_context(
                    config, lst, svc.contexts.get(lst.name), staged.provider
                )
            # A reassign_to that startup would refuse fails the reload the same way.
            await svc.refuse_unsafe_reassign(
                {name: staged.contexts[name] for name in (*plan.added, *plan.changed)}
            )
            for name in (*plan.added, *plan.rebind):
                holder = (
                    CurrentContext(staged.contexts[name])
                    if name in plan.added
                    else svc.listening[name].holder
                )
                staged.bound[name] = await bind(holder, staged.contexts[name])
        except BaseException:
            with trio.CancelScope(shield=True):
                for listening in staged.bound.values():
                    await listening.discard()
                for provisioner in svc.provisioners - before:
                    svc.provisioners.discard(provisioner)
                    with trio.move_on_after(5):
                        await provisioner.aclose()
            raise
        return staged

    async def _commit(self, plan: Plan, staged: _Staged) -> None:
        """Apply a staged reload; nothing here fails."""
        svc = self._service
        old_config = svc.config
        config = plan.config
        svc.config = config
        if staged.provider is not None:
            svc.provider = staged.provider
        fmt = config.log.format or svc.log_format
        switch(fmt, LEVELS[config.log.level])
        replaced: list[tuple[CurrentContext, ListenerContext]] = []
        # Backends pooled under a listener's old settings are not handed out again.
        gone = {*plan.removed, *plan.changed}
        svc.pool.close_where(lambda k: k.listener in gone, "listener_changed")
        for name, ctx in staged.contexts.items():
            if name in plan.added:
                continue
            holder = svc.listening[name].holder
            replaced.append((holder, holder.current))
            holder.current = ctx
            svc.contexts[name] = ctx
        for name in plan.added:
            svc.contexts[name] = staged.contexts[name]
        svc.health.expect_listeners([lst.name for lst in config.listeners])
        for name in plan.added:
            await svc.start_accepting(name, staged.bound[name])
            self._check_backend(name)
        for name in plan.rebind:
            old = svc.listening[name]
            await svc.start_accepting(name, staged.bound[name])
            await old.stop()
        for name in plan.removed:
            await self._remove_listener(name)
        for name in plan.changed:
            self._check_backend(name)
        current = {ctx.provisioner for ctx in svc.contexts.values()}
        for provisioner in current:
            svc.start_expiry(provisioner)
        for holder, old_ctx in replaced:
            if old_ctx.provisioner not in current:
                svc.start_background(functools.partial(self._retire, holder, old_ctx))
        if config.revalidation.interval != old_config.revalidation.interval:
            svc.restart_revalidation()
        if plan.added or plan.removed or plan.changed:
            svc.restart_reapers()
        svc.publish_addresses()

    def _check_backend(self, name: str) -> None:
        """The readiness check of listener ``name``'s backend, through its current
        provisioner (replacing the check of an earlier one)."""
        svc = self._service
        svc.health.add_check(f"backend:{name}", backend_check(svc.contexts[name].provisioner.pools))

    async def _remove_listener(self, name: str) -> None:
        """A listener a reload removed: it stops accepting and its sessions drain."""
        svc = self._service
        listening = svc.listening.pop(name)
        del svc.contexts[name]
        svc.health.listener_stopped(name)
        svc.health.remove_check(f"backend:{name}")
        for c in listening.holder.contexts():
            c.accepting = False
        await listening.stop()
        self._draining.append(listening.holder)
        svc.start_background(functools.partial(self._drain_listener, name, listening.holder))

    async def _retire(self, holder: CurrentContext, ctx: ListenerContext) -> None:
        """Close a provisioner no current context uses once the sessions of ``ctx`` are over
        (they keep their backend until they end)."""
        await holder.wait_idle(ctx)
        await self._close_if_unused(ctx.provisioner)

    async def _close_if_unused(self, provisioner: Provisioner) -> None:
        svc = self._service
        if self._provisioner_in_use(provisioner) or provisioner not in svc.provisioners:
            return
        svc.provisioners.discard(provisioner)
        svc.stop_expiry(provisioner)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await provisioner.aclose()

    def _provisioner_in_use(self, provisioner: Provisioner) -> bool:
        """A current context uses it, or a connection of an earlier context still runs."""
        if any(c.provisioner is provisioner for c in self._service.contexts.values()):
            return True
        return any(
            c.provisioner is provisioner and holder.tasks(c)
            for holder in self.holders()
            for c in holder.contexts()
        )

    async def _drain_listener(self, name: str, holder: CurrentContext) -> None:
        """A listener removed by a reload (no longer accepting): let its sessions finish
        within ``drain_timeout``, then end the rest with a FATAL."""
        svc = self._service
        try:
            contexts = holder.contexts()
            log.info(
                "listener_draining",
                listener=name,
                connections=holder.tasks(),
                drain_timeout=svc.config.drain_timeout,
            )
            with trio.move_on_after(svc.config.drain_timeout):
                await holder.wait_idle()
            if holder.tasks():
                ended = 0
                for live in svc.registry:
                    if live.owner in contexts:
                        live.end(errors.listener_removed(), "listener_removed")
                        ended += 1
                log.info("listener_drain_deadline", listener=name, sessions=ended)
                with trio.move_on_after(FINAL_GRACE):
                    await holder.wait_idle()
            log.info("listener_removed", listener=name, connections=holder.tasks())
        finally:
            self._draining.remove(holder)
        for c in contexts:
            await self._close_if_unused(c.provisioner)
