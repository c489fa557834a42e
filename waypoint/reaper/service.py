"""The reaper as a background service of ``waypoint.run`` (``app._extra_background`` calls
:func:`reaper_tasks`): one periodic task per listener, counted in the metrics. Each pass first
ends orphan backends (:mod:`waypoint.reaper.orphans`),
then drops roles. :func:`sweep_orphans_at_start` is the one sweep ``run`` makes before it
accepts connections.

The reaper does not depend on the proxy: the app gives it each listener as a
:class:`ReapTarget` (plain values) and this instance's live sessions as
:class:`LiveSessions` (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Final, Protocol

import attrs
import trio

from waypoint.config.model import Config, ListenerConfig
from waypoint.observability.log import get_logger
from waypoint.observability.metrics import Metrics
from waypoint.provision.admin import AdminError
from waypoint.provision.engine import Provisioner
from waypoint.reaper.engine import Reaper
from waypoint.reaper.orphans import OrphanSweeper, Pass
from waypoint.reaper.schedule import reap_periodically
from waypoint.state.base import StateStore


@attrs.frozen
class ReapTarget:
    """One listener as the reaper sees it."""

    listener: ListenerConfig
    provisioner: Provisioner
    state: StateStore
    #: Shared state (Redis): another instance's sessions hold slots there.
    shared_state: bool
    #: Ends this instance's idle kept (pooled) backends of the given roles; how many ended.
    release_idle: Callable[[Collection[str]], Awaitable[int]] | None = None


class LiveSessions(Protocol):
    """This instance's live sessions (the proxy's session registry)."""

    def roles_in_use(self, listener: str) -> set[str]: ...

    def backend_pids(self, listener: str) -> set[int]: ...


#: The start sweep waits this long at most (per instance) before accepting connections.
START_SWEEP_TIMEOUT: Final = 10.0

log = get_logger("reaper")


def _sweeper(
    ctx: ReapTarget,
    contexts: Mapping[str, ReapTarget],
    registry: LiveSessions,
    metrics: Metrics,
) -> OrphanSweeper:
    known = frozenset(contexts)
    name = ctx.listener.name

    def roles_in_use() -> set[str]:
        out: set[str] = set()
        for listener in known:
            out |= registry.roles_in_use(listener)
        return out

    async def live_elsewhere(principal: str) -> bool:
        # Slots are taken before a backend is connected and given back after it is gone:
        # a slot of this caller on this listener may be a live session of another instance.
        usage = await ctx.state.slot_usage(principal, name)
        return usage.user_listener > 0

    def on_ended(kind: Pass, count: int) -> None:
        reason = "orphan_at_start" if kind == "start" else "orphan"
        metrics.backend_ended(name, reason, "pg_terminate_backend", count)

    return OrphanSweeper(
        ctx.listener,
        ctx.provisioner.pools,
        known_listeners=known,
        roles_in_use=roles_in_use,
        pids_in_use=lambda: registry.backend_pids(name),
        live_elsewhere=live_elsewhere if ctx.shared_state else None,
        on_ended=on_ended,
    )


async def sweep_orphans_at_start(
    contexts: Mapping[str, ReapTarget], registry: LiveSessions, metrics: Metrics
) -> None:
    """End the orphans of every postgres listener once (a restarted instance's leftovers).
    Bounded; a failure is logged and the instance starts anyway (the periodic pass retries
    for roles past their expiry)."""
    with trio.move_on_after(START_SWEEP_TIMEOUT) as scope:
        for name, ctx in contexts.items():
            if ctx.listener.mode != "postgres":
                continue
            try:
                await _sweeper(ctx, contexts, registry, metrics).sweep("start")
            except Exception as exc:
                log.warning("orphan_sweep_failed", listener=name, sweep="start", error=str(exc))
    if scope.cancelled_caught:
        log.warning("orphan_sweep_timeout", sweep="start", timeout=START_SWEEP_TIMEOUT)


async def reassign_target_problems(contexts: Mapping[str, ReapTarget]) -> list[str]:
    """Why each listener's ``reassign_to`` may not receive callers' objects, read from the
    catalog now (startup refuses to run with any). A server that cannot be asked is logged
    and skipped: every reaper pass checks again before it reassigns anything."""
    known = frozenset(contexts)
    problems: list[str] = []
    for name, ctx in contexts.items():
        if ctx.listener.mode != "postgres" or ctx.listener.postgres.reassign_to is None:
            continue
        reaper = Reaper(ctx.listener, ctx.provisioner, roles_in_use=set, known_listeners=known)
        problem: str | None = None
        with trio.move_on_after(START_SWEEP_TIMEOUT) as scope:
            try:
                problem = await reaper.check_reassign_to()
            except AdminError as exc:
                log.warning("reassign_to_unchecked", listener=name, error=str(exc))
        if scope.cancelled_caught:
            log.warning("reassign_to_unchecked", listener=name, error="timed out")
        if problem is not None:
            problems.append(f"listener {name!r}: reassign_to refused: {problem}")
    return problems


def reaper_tasks(
    config: Config,
    contexts: Mapping[str, ReapTarget],
    registry: LiveSessions,
    metrics: Metrics,
) -> list[Callable[[], Awaitable[None]]]:
    """One task per listener: a pass at start, then every ``effective_reap_interval``."""
    known = frozenset(contexts)

    def roles_in_use() -> set[str]:
        # Every listener's sessions: a role in use anywhere in this instance is kept.
        out: set[str] = set()
        for listener in known:
            out |= registry.roles_in_use(listener)
        return out

    tasks: list[Callable[[], Awaitable[None]]] = []
    for name, ctx in contexts.items():
        if ctx.listener.mode != "postgres":
            continue
        reaper = Reaper(
            ctx.listener,
            ctx.provisioner,
            roles_in_use=roles_in_use,
            known_listeners=known,
            release_idle=ctx.release_idle,
        )
        sweeper = _sweeper(ctx, contexts, registry, metrics)
        tasks.append(
            _make_task(
                reaper, sweeper, name, ctx.listener.postgres.effective_reap_interval, metrics
            )
        )
    return tasks


def _make_task(
    reaper: Reaper, sweeper: OrphanSweeper, name: str, interval: float, metrics: Metrics
) -> Callable[[], Awaitable[None]]:
    async def one_pass() -> None:
        metrics.reaper_runs.labels(name).inc()
        # A separate step: orphan backends end first (an expired role is dropped at a later
        # pass, once pg_stat_activity shows no session of it).
        try:
            await sweeper.sweep("periodic")
        except Exception as exc:
            log.warning("orphan_sweep_failed", listener=name, sweep="periodic", error=str(exc))
            metrics.reaper_errors.labels(name).inc()
        report = await reaper.run_pass()
        dropped = len(report.dropped_roles) + len(report.dropped_groups)
        if dropped:
            metrics.reaper_dropped.labels(name).inc(dropped)
        if report.failed:
            metrics.reaper_errors.labels(name).inc(len(report.failed))

    def on_error(_exc: BaseException | None) -> None:
        metrics.reaper_errors.labels(name).inc()

    async def task() -> None:
        await reap_periodically(one_pass, interval, on_error=on_error, name=name)

    return task
