"""The reaper inside a running Waypoint: ``user_ttl = "3s"``, ``reap_interval =
"1s"``. Expiry is decided by the server's clock, so these tests use real time with generous
bounds (docs/design.md#tests)."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pg8000.native
import trio
from e2e_support import LISTENER, E2EEnv, create_app_database, make_config_text, run_waypoint
from localapi_standin import run_standin
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster
from provision_support import role_exists

from waypoint.config.load import load_config_text

_counter = itertools.count(1)


@contextlib.asynccontextmanager
async def short_ttl_env(pg: PgCluster, tmp_path: Path, prefix: str) -> AsyncIterator[E2EEnv]:
    async with run_standin(tmp_path) as standin:
        text = make_config_text(
            pg,
            socket_path=standin.socket_path,
            postgres_extra=f'user_ttl = "3s"\nreap_interval = "1s"\nuser_prefix = "{prefix}"',
        )
        # user_ttl must be at least twice handshake_timeout.
        text = text.replace('handshake_timeout = "10s"', 'handshake_timeout = "1.5s"', 1)
        config = load_config_text(text, source="e2e-reaper.toml")
        async with run_waypoint(config) as running:
            yield E2EEnv(pg, standin, running, config)


async def connect(env: E2EEnv, db: str, source: str) -> pg8000.native.Connection:
    """Connect through Waypoint. ``user_ttl = "3s"`` forces ``handshake_timeout`` down to
    1.5 s, which a loaded 2-core machine can miss: a handshake timeout (08006) is retried
    twice; anything else fails the test."""
    for attempt in range(3):
        try:
            with trio.fail_after(30):
                return await env.pg8000_connect(db, source=source)
        except DatabaseError as exc:
            fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            if (
                fields.get("C") != "08006"
                or "timed out" not in str(fields.get("M"))
                or attempt == 2
            ):
                raise
    raise AssertionError("unreachable")


async def current_user(conn: pg8000.native.Connection) -> str:
    rows = await trio.to_thread.run_sync(conn.run, "SELECT current_user")
    return str(rows[0][0])


async def test_idle_role_is_reaped_after_ttl_and_open_sessions_role_stays(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    prefix = f"e{os.getpid() % 100000}x{next(_counter)}_"
    async with short_ttl_env(pg, tmp_path, prefix) as env:
        env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}})
        env.grant("127.0.0.3", {db: {"permissions": ["readonly"]}})
        staying = await connect(env, db, "127.0.0.2")
        try:
            staying_role = await current_user(staying)
            leaving = await connect(env, db, "127.0.0.3")
            leaving_role = await current_user(leaving)
            assert leaving_role.startswith(prefix) and staying_role.startswith(prefix)
            await trio.to_thread.run_sync(leaving.close)

            def dropped_count() -> float:
                value = env.running.metrics.registry.get_sample_value(
                    "waypoint_reaper_dropped_roles_total", {"listener": LISTENER}
                )
                return value or 0.0

            # Gone within 10 s of the disconnect (VALID UNTIL 3 s, a pass every second); the
            # metric is counted when the pass returns, just after the DROP ROLE commits.
            with trio.fail_after(10):
                while role_exists(pg, leaving_role) or dropped_count() < 1:
                    await trio.sleep(0.25)

            # The open session's role outlived its VALID UNTIL and several passes.
            assert role_exists(pg, staying_role)
            rows = await trio.to_thread.run_sync(staying.run, "SELECT count(*) FROM t")
            assert rows == [[1]]
            runs = env.running.metrics.registry.get_sample_value(
                "waypoint_reaper_runs_total", {"listener": LISTENER}
            )
            assert runs is not None and runs >= 2
        finally:
            await trio.to_thread.run_sync(staying.close)
