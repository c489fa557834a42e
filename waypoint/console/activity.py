"""The ``state`` column of SHOW SESSIONS: what ``pg_stat_activity`` says each session's backend
is doing (``idle``, ``active``, ``idle in transaction``, ...), read through each listener's
admin connection. The admin sees its roles' backends (it is a member of each role)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from waypoint.provision.admin import AdminPools, AdminSession
from waypoint.proxy.context import ListenerContext
from waypoint.proxy.registry import LiveSession

_STATES: Final = (
    "SELECT a.pid, a.state FROM pg_catalog.pg_stat_activity AS a "
    "WHERE a.pid = ANY(CAST(:pids AS pg_catalog.int4[])) AND a.usename = ANY(CAST(:roles AS pg_catalog.text[]))"
)


async def backend_states(
    context_for: Callable[[LiveSession], ListenerContext | None],
    sessions: Sequence[LiveSession],
) -> dict[str, str]:
    """conn_id → the backend's ``pg_stat_activity.state`` for ``sessions`` (one statement per
    backend server). ``context_for`` names the context whose admin pool reaches a session's
    backend (None: none does). Sessions whose backend is not found are left out."""
    groups: dict[int, tuple[AdminPools, list[LiveSession]]] = {}
    for live in sessions:
        if live.backend_pid is None:
            continue
        ctx = context_for(live)
        if ctx is None:
            continue
        pools = ctx.provisioner.pools
        groups.setdefault(id(pools), (pools, []))[1].append(live)
    out: dict[str, str] = {}
    for pools, group in groups.values():
        pids = sorted({int(s.backend_pid) for s in group if s.backend_pid is not None})
        roles = sorted({s.role for s in group})

        def run(
            sess: AdminSession, pids: list[int] = pids, roles: list[str] = roles
        ) -> list[tuple[int, str]]:
            return [(int(r[0]), str(r[1] or "")) for r in sess.run(_STATES, pids=pids, roles=roles)]

        states = dict(await pools.run(pools.admin_database, run))
        for live in group:
            if live.backend_pid in states:
                out[live.conn_id] = states[live.backend_pid]
    return out
