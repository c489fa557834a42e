"""The reaper as a background service of ``waypoint.run`` (``app._extra_background`` calls
:func:`reaper_tasks`): one periodic task per listener, counted in the metrics.

Proxy types are imported for type checking only: the reaper does not depend on the proxy
at run time (ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from waypoint.config.model import Config
from waypoint.reaper.engine import Reaper
from waypoint.reaper.schedule import reap_periodically

if TYPE_CHECKING:
    from waypoint.observability.metrics import Metrics
    from waypoint.proxy.registry import SessionRegistry
    from waypoint.proxy.session import ListenerContext


def reaper_tasks(
    config: Config,
    contexts: Mapping[str, ListenerContext],
    registry: SessionRegistry,
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
        )
        tasks.append(
            _make_task(reaper, name, ctx.listener.postgres.effective_reap_interval, metrics)
        )
    return tasks


def _make_task(
    reaper: Reaper, name: str, interval: float, metrics: Metrics
) -> Callable[[], Awaitable[None]]:
    async def one_pass() -> None:
        metrics.reaper_runs.labels(name).inc()
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
