"""A reaper pass meets SQL that fails for one role (docs/operations.md#the-role-reaper).

One expired role owns a table in a database the admin may not connect to, so its
``REASSIGN OWNED`` / ``DROP OWNED`` cannot run there and ``DROP ROLE`` fails. The pass
reports that role as failed and still drops the others; the next pass retries it and,
once the obstacle is gone, drops it. Waypoint keeps serving, and no advisory lock is left
held by an admin session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pg8000.native
import pytest
import trio
from e2e_support import LISTENER, E2EEnv, create_app_database, e2e_env, roles_with_prefix
from pgcluster import PgCluster

from waypoint.app import reap_targets
from waypoint.reaper import Reaper

pytestmark = pytest.mark.pg

IDENTITIES = ("127.0.0.7", "127.0.0.8", "127.0.0.9")


def _reaper(env: E2EEnv, *, release_idle: bool = True) -> Reaper:
    """The listener's reaper as the app builds it (``release_idle``: the app's way to end the
    pooled backends of expired roles first)."""
    ctx = env.running.contexts[LISTENER]
    target = reap_targets(env.running.contexts)[LISTENER]
    return Reaper(
        ctx.listener,
        ctx.provisioner,
        roles_in_use=lambda: env.running.registry.roles_in_use(LISTENER),
        known_listeners={LISTENER},
        release_idle=target.release_idle if release_idle else None,
    )


async def test_a_pooled_backend_does_not_keep_an_expired_role_alive(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The attack: a caller's role expires on the server's clock (here: VALID UNTIL set in
    the past behind Waypoint's back, so the pool's own expiry timer knows nothing) while an
    idle backend of it waits in the pool. That backend is a session in pg_stat_activity; a
    reaper that counted it would keep the role until the pool let go of it. The app's
    reaper ends this instance's pooled backends of expired roles first, then drops them."""
    from test_e2e_pool import wait_pooled

    prefix = f"wprpool{os.getpid() % 100000}_"
    db = create_app_database(pg)
    with trio.fail_after(120):
        async with e2e_env(
            pg, tmp_path, postgres_extra=f'user_prefix = "{prefix}"\nreap_interval = "1h"'
        ) as env:
            env.grant("127.0.0.7", {db: {"permissions": ["readonly"]}})
            conn = await env.pg8000_connect(db, source="127.0.0.7")
            try:
                role = (await trio.to_thread.run_sync(conn.run, "SELECT current_user"))[0][0]
                pid = (await trio.to_thread.run_sync(conn.run, "SELECT pg_backend_pid()"))[0][0]
            finally:
                await trio.to_thread.run_sync(conn.close)
            await wait_pooled(env, 1)
            pg.execute(f"ALTER ROLE {pg8000.native.identifier(role)} VALID UNTIL '2000-01-01'")

            # Without the release, the pooled backend keeps the role (what must not happen).
            report = await _reaper(env, release_idle=False).run_pass()
            assert [s.role for s in report.skipped] == [role], report
            assert "live session" in report.skipped[0].reason

            report = await _reaper(env).run_pass()
            assert report.dropped_roles == (role,), report
            assert role not in roles_with_prefix(pg, prefix)
            gone = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = :p", p=pid)
            assert gone == [[0]]
            await wait_pooled(env, 0)
            await env.assert_clean()


def _admin_advisory_locks(cluster: PgCluster) -> int:
    rows = cluster.execute(
        "SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND a.usename = :u",
        u=cluster.admin_user,
    )
    return int(rows[0][0])


async def test_reaper_pass_goes_on_when_one_roles_drop_fails(pg: PgCluster, tmp_path: Path) -> None:
    prefix = f"wpreap{os.getpid() % 100000}_"
    db = create_app_database(pg)
    locked = f"locked{os.getpid()}_{db}"
    pg.create_database(locked)
    pg.execute(f"REVOKE CONNECT ON DATABASE {pg8000.native.identifier(locked)} FROM PUBLIC")
    try:
        with trio.fail_after(180):
            async with e2e_env(
                pg,
                tmp_path,
                postgres_extra=f'user_prefix = "{prefix}"\nreap_interval = "1h"',
            ) as env:
                roles: dict[str, str] = {}
                for ip in IDENTITIES:
                    env.grant(ip, {db: {"permissions": ["readonly"]}})
                    conn = await env.pg8000_connect(db, source=ip)
                    try:
                        roles[ip] = (await trio.to_thread.run_sync(conn.run, "SELECT current_user"))[0][0]
                    finally:
                        await trio.to_thread.run_sync(conn.close)
                await env.assert_clean()
                stuck, *others = (roles[ip] for ip in IDENTITIES)
                assert set(roles.values()) <= roles_with_prefix(pg, prefix)

                # The obstacle: a table owned by `stuck` where the admin cannot connect.
                pg.execute(
                    f"CREATE TABLE public.obstacle (i int); "
                    f"ALTER TABLE public.obstacle OWNER TO {pg8000.native.identifier(stuck)}",
                    dbname=locked,
                )
                for role in roles.values():
                    pg.execute(
                        f"ALTER ROLE {pg8000.native.identifier(role)} VALID UNTIL '2000-01-01'"
                    )

                reaper = _reaper(env)
                report = await reaper.run_pass()
                failed = {f.role: f.reason for f in report.failed}
                assert stuck in failed, report
                assert failed[stuck], report
                assert set(others) <= set(report.dropped_roles), report
                left = roles_with_prefix(pg, prefix)
                assert stuck in left
                assert not set(others) & left
                assert _admin_advisory_locks(pg) == 0

                # Waypoint keeps serving a caller meanwhile.
                env.grant("127.0.0.10", {db: {"permissions": ["readonly"]}})
                conn = await env.pg8000_connect(db, source="127.0.0.10")
                try:
                    rows = await trio.to_thread.run_sync(conn.run, "SELECT v FROM public.t")
                    assert rows == [["one"]]
                finally:
                    await trio.to_thread.run_sync(conn.close)
                await env.assert_clean()

                # The next pass retries the stuck role (and fails the same way) ...
                again = await reaper.run_pass()
                assert stuck in {f.role for f in again.failed}, again
                # ... and drops it once the obstacle is gone.
                pg.execute("DROP TABLE public.obstacle", dbname=locked)
                final = await reaper.run_pass()
                assert stuck in final.dropped_roles, final
                assert not final.failed, final
                assert stuck not in roles_with_prefix(pg, prefix)
                assert _admin_advisory_locks(pg) == 0
    finally:
        pg.drop_database(locked)
