"""The reaper's orphan sweep against real PostgreSQL 15 and 18: backends of Waypoint's roles
that no live session owns are terminated; those of this instance's sessions, of callers with
a live session elsewhere, of unexpired roles (in the periodic pass) and of unmarked roles are
left alone."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pg8000.native
import test_reaper_pg
import trio
from pg8000.native import identifier, literal
from pgcluster import PgCluster
from test_reaper_pg import ALICE, BOB, Env, connect_as, expire, grant

from waypoint.grants.model import Preset
from waypoint.identity.model import Identity
from waypoint.reaper.orphans import OrphanSweeper

CAROL = Identity(login="carol@example.com", node="carol-pc")
DAVE = Identity(login="dave@example.com", node="dave-pc")
ERIN = Identity(login="erin@example.com", node="erin-pc")


orphan_db = test_reaper_pg.app_db
orphan_env = test_reaper_pg.env


def _pids(pg: PgCluster, role: str) -> list[int]:
    rows = pg.execute(
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE usename = :r ORDER BY 1", r=role
    )
    return [int(r[0]) for r in rows]


async def _wait_no_backend(pg: PgCluster, role: str) -> None:
    with trio.fail_after(20):
        while await trio.to_thread.run_sync(_pids, pg, role):
            await trio.sleep(0.05)


async def _five_backends(
    pg: PgCluster, db: str, env: Env
) -> tuple[list[str], list[pg8000.native.Connection]]:
    """One backend each for alice (expired long ago), bob (not expired), carol (expired, in
    use by this instance), dave (expired 5 s ago: within the grace), erin (expired)."""
    readonly = grant(db, (Preset.READONLY, "public"))
    roles: list[str] = []
    conns: list[pg8000.native.Connection] = []
    for who in (ALICE, BOB, CAROL, DAVE, ERIN):
        creds = await env.provision(who, readonly)
        roles.append(creds.role)
        conns.append(await trio.to_thread.run_sync(connect_as, pg, creds, db))
    alice, _bob, carol, dave, erin = roles
    for role in (alice, carol, erin):
        expire(pg, role)
    recent = datetime.now(UTC) - timedelta(seconds=5)
    pg.execute(
        f"ALTER ROLE {identifier(dave)} VALID UNTIL "
        f"{literal(recent.strftime('%Y-%m-%d %H:%M:%S+00'))}"
    )
    return roles, conns


async def _close_all(conns: list[pg8000.native.Connection]) -> None:
    for conn in conns:
        with contextlib.suppress(pg8000.native.InterfaceError, OSError):
            await trio.to_thread.run_sync(conn.close)


async def _backends(pg: PgCluster, role: str) -> int:
    return len(await trio.to_thread.run_sync(_pids, pg, role))


async def test_periodic_sweep_on_the_memory_store_ends_only_roles_expired_past_the_grace(
    pg: PgCluster, orphan_db: str, orphan_env: Env
) -> None:
    roles, conns = await _five_backends(pg, orphan_db, orphan_env)
    alice, bob, carol, dave, erin = roles
    try:
        sweeper = OrphanSweeper(
            orphan_env.listener, orphan_env.prov.pools, roles_in_use=lambda: {carol}
        )
        with trio.fail_after(30):
            report = await sweeper.sweep("periodic")
        assert sorted(role for role, _ in report.ended) == sorted([alice, erin]), report
        await _wait_no_backend(pg, alice)
        await _wait_no_backend(pg, erin)
        for role in (bob, carol, dave):
            assert await _backends(pg, role) == 1, role

        # At start every backend of the listener's roles is an orphan, except those of this
        # instance's sessions.
        with trio.fail_after(30):
            report = await sweeper.sweep("start")
        assert sorted(role for role, _ in report.ended) == sorted([bob, dave]), report
        for role in (bob, dave):
            await _wait_no_backend(pg, role)
        assert await _backends(pg, carol) == 1
    finally:
        await _close_all(conns)


async def test_sweeps_with_shared_state_keep_callers_live_on_another_instance(
    pg: PgCluster, orphan_db: str, orphan_env: Env
) -> None:
    """With shared state, a backend whose caller holds no slot anywhere is an orphan whether
    or not its role expired; a caller with a slot on another instance keeps its backends."""
    roles, conns = await _five_backends(pg, orphan_db, orphan_env)
    alice, bob, carol, dave, erin = roles
    asked: list[str] = []

    async def live_elsewhere(principal: str) -> bool:
        asked.append(principal)
        return principal == ERIN.principal

    try:
        sweeper = OrphanSweeper(
            orphan_env.listener,
            orphan_env.prov.pools,
            roles_in_use=lambda: {carol},
            live_elsewhere=live_elsewhere,
        )
        with trio.fail_after(30):
            report = await sweeper.sweep("periodic")
        assert sorted(role for role, _ in report.ended) == sorted([alice, bob, dave]), report
        for role in (alice, bob, dave):
            await _wait_no_backend(pg, role)
        for role in (carol, erin):
            assert await _backends(pg, role) == 1, role
        assert ERIN.principal in asked
        with trio.fail_after(30):
            report = await sweeper.sweep("start")
        assert report.ended == ()
    finally:
        await _close_all(conns)


async def test_sweep_leaves_unmarked_roles_alone(
    pg: PgCluster, orphan_db: str, orphan_env: Env
) -> None:
    env = orphan_env
    plain = f"{env.prefix}plain"
    pg.execute(f"CREATE ROLE {identifier(plain)} LOGIN")
    pg.execute(f"GRANT {identifier(plain)} TO {identifier(pg.admin_user)}")
    conn = await trio.to_thread.run_sync(lambda: pg.connect(user=plain, dbname=orphan_db))
    try:
        sweeper = OrphanSweeper(env.listener, env.prov.pools)
        with trio.fail_after(30):
            report = await sweeper.sweep("start")
        assert report.ended == ()
        assert len(await trio.to_thread.run_sync(_pids, pg, plain)) == 1
    finally:
        await trio.to_thread.run_sync(conn.close)
        pg.execute(f"DROP ROLE {identifier(plain)}")
