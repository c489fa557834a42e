"""Faults in Waypoint's dependencies (docs/security.md, fail-closed): the backend restarting or down, a
wrong admin password, tailscaled missing or hanging, Redis stopping. Each time the client gets
a clear refusal (SQLSTATE and message) or, for a live session the fault kills, an error;
Waypoint stays up; nothing is granted while a dependency fails (no role created, no session
established); and the next connection works once the dependency is back.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trio
from e2e_support import (
    E2EEnv,
    create_app_database,
    e2e_env,
    make_config_text,
    roles_with_prefix,
    run_waypoint,
)
from fixtures_pg import PrivatePg
from localapi_standin import run_standin
from pgcluster import PgCluster
from state_support import OwnRedis

from waypoint.config.load import load_config_text

pytestmark = pytest.mark.pg

PREFIX = "wp_"
IDENTITY_TIMEOUT = 2.0  # make_config_text's [identity] timeout


@pytest.fixture(params=["system", "18"], ids=["pg15", "pg18"])
def own_pg(request: pytest.FixtureRequest, private_pg: PrivatePg) -> Iterator[PgCluster]:
    """A cluster this test may stop, start and restart (PostgreSQL 15 and 18)."""
    with private_pg(request.param) as cluster:
        yield cluster


def _pg_ctl(cluster: PgCluster, action: str) -> None:
    """stop / start / restart the cluster's postmaster on the same data directory and port."""
    args: list[str | Path] = [action, "-w", "-t", "60"]
    if action in ("stop", "restart"):
        args += ["-m", "fast"]
    if action in ("start", "restart"):
        args += ["-l", cluster.datadir / "server.log"]
    cluster._pg_ctl(*args)


def _connect_error(env: E2EEnv, db: str, source: str = "127.0.0.1") -> dict[str, str]:
    """Connect through Waypoint expecting a refusal: its ErrorResponse fields. The client's
    socket timeout bounds the wait: a refusal that does not come in time is a socket error,
    not an ErrorResponse."""
    try:
        conn = pg8000.native.Connection(
            user="anyone", host=env.host, port=env.port, database=db, timeout=30,
            source_address=(source, 0),
        )  # fmt: skip
    except pg8000.native.DatabaseError as exc:
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {"M": str(exc)}
        return {str(k): str(v) for k, v in fields.items()}
    conn.close()
    raise AssertionError("the connection was accepted while a dependency was failing")


async def _refused(env: E2EEnv, db: str, source: str = "127.0.0.1") -> dict[str, str]:
    return await trio.to_thread.run_sync(lambda: _connect_error(env, db, source))


async def _query(conn: pg8000.native.Connection, sql: str) -> Any:
    return await trio.to_thread.run_sync(conn.run, sql)


async def _close(conn: pg8000.native.Connection) -> None:
    with contextlib.suppress(Exception):
        await trio.to_thread.run_sync(conn.close)


async def _works(env: E2EEnv, db: str, source: str = "127.0.0.1") -> None:
    conn = await env.pg8000_connect(db, source=source)
    try:
        assert await _query(conn, "SELECT v FROM public.t WHERE id = 1") == [["one"]]
    finally:
        await _close(conn)


async def test_backend_restart_mid_session_errors_the_session_and_waypoint_keeps_serving(
    own_pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(own_pg)
    with trio.fail_after(120):
        async with e2e_env(own_pg, tmp_path) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}})
            conn = await env.pg8000_connect(db)
            try:
                assert await _query(conn, "SELECT 1") == [[1]]
                await trio.to_thread.run_sync(_pg_ctl, own_pg, "restart")
                with pytest.raises((pg8000.native.InterfaceError, pg8000.native.DatabaseError)):
                    await _query(conn, "SELECT 1")
            finally:
                await _close(conn)
            await env.assert_clean()
            await _works(env, db)

            # Backend down at connect: 08006 naming the listener; no role for a new caller.
            await trio.to_thread.run_sync(_pg_ctl, own_pg, "stop")
            err = await _refused(env, db, source="127.0.0.2")
            assert err.get("C") == "08006", err
            assert "unavailable" in err.get("M", ""), err
            await env.assert_clean()
            await trio.to_thread.run_sync(_pg_ctl, own_pg, "start")
            assert not {r for r in roles_with_prefix(own_pg, PREFIX) if "user2_example_com" in r}
            await _works(env, db)
            await env.assert_clean()
            # (A new identity's first provision right after the restart: see
            # tests/pending_faults_admin_pool.py.)


async def test_wrong_admin_password_is_58000_with_a_correlation_id_and_a_log_line(
    pg: PgCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = create_app_database(pg)
    bad = pg.admin_password + "-wrong"
    before = roles_with_prefix(pg, PREFIX)
    caplog.set_level(logging.INFO, logger="waypoint")
    async with run_standin(tmp_path) as standin:
        text = make_config_text(pg, socket_path=standin.socket_path)
        real = f'admin_password = "{pg.admin_password}"'
        assert real in text
        config = load_config_text(text.replace(real, f'admin_password = "{bad}"'), source="bad.toml")
        async with run_waypoint(config) as running:
            env = E2EEnv(pg, standin, running, config)
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            for _ in range(2):  # not cached: every attempt is refused the same way
                err = await _refused(env, db)
                assert err.get("C") == "58000", err
                m = re.search(r"correlation id ([0-9A-Za-z_-]+)", err.get("M", ""))
                assert m, err
                conn_id = m[1]
                logged = [
                    f"{r.getMessage()} {getattr(r, 'wp_fields', '')}"
                    for r in caplog.records
                    if r.levelno >= logging.WARNING
                ]
                clear = [
                    line for line in logged
                    if conn_id in line and "password authentication failed" in line
                ]  # fmt: skip
                assert clear, f"no log line explains correlation id {conn_id}: {logged}"
            # Neither password appears in any log line.
            for r in caplog.records:
                line = f"{r.getMessage()} {getattr(r, 'wp_fields', '')}"
                assert bad not in line and pg.admin_password not in line
            await env.assert_clean()
    assert roles_with_prefix(pg, PREFIX) <= before  # none created (the reaper may drop leftovers)


async def test_localapi_unavailable_fails_closed_with_08004_in_time(
    pg: PgCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tailscaled's socket missing, tailscaled hanging, tailscaled answering 500: each caller
    is refused with 08004 (a hang by the identity timeout, which the log names; the client's
    socket timeout bounds every wait), and no role is created; once
    tailscaled is back, callers get in (a fresh identity each time: refusals are cached per
    peer for 5 s)."""
    caplog.set_level(logging.INFO, logger="waypoint")
    db = create_app_database(pg)
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path) as env:
            for n, fault in enumerate(("missing", "hang", "status500")):
                refused_ip, later_ip = f"127.0.0.{20 + 2 * n}", f"127.0.0.{21 + 2 * n}"
                for ip in (refused_ip, later_ip):
                    env.grant(ip, {db: {"permissions": ["readonly"]}})
                before = roles_with_prefix(pg, PREFIX)
                moved = env.standin.socket_path + ".gone"
                if fault == "missing":
                    Path(env.standin.socket_path).rename(moved)
                else:
                    env.standin.set_fault(fault)  # type: ignore[arg-type]
                for _ in range(2):
                    err = await _refused(env, db, source=refused_ip)
                    assert err.get("C") == "08004", (fault, err)
                    assert "unavailable" in err.get("M", ""), (fault, err)
                if fault == "hang":
                    lines = [f"{r.getMessage()} {getattr(r, 'wp_fields', '')}" for r in caplog.records]
                    timed_out = f"no complete answer within {IDENTITY_TIMEOUT:g}s"
                    assert any(timed_out in line for line in lines), lines[-20:]
                assert roles_with_prefix(pg, PREFIX) <= before  # none created (the reaper may drop leftovers), fault
                await env.assert_clean()
                if fault == "missing":
                    Path(moved).rename(env.standin.socket_path)
                else:
                    env.standin.set_fault(None)
                await _works(env, db, source=later_ip)
                await env.assert_clean()


async def test_redis_stopped_refuses_new_connections_and_live_sessions_continue(
    pg: PgCluster, tmp_path: Path, own_redis: OwnRedis
) -> None:
    db = create_app_database(pg)
    redis = own_redis
    try:
        state = f'[state]\nbackend = "redis"\nurl = "{redis.url}"\nkey_prefix = "wpfault:"\n'
        with trio.fail_after(120):
            async with e2e_env(pg, tmp_path, tables_extra=state) as env:
                env.grant("127.0.0.4", {db: {"permissions": ["readonly"]}}, login="r4@example.com")
                env.grant("127.0.0.5", {db: {"permissions": ["readonly"]}}, login="r5@example.com")
                env.grant("127.0.0.6", {db: {"permissions": ["readonly"]}}, login="r6@example.com")
                live = await env.pg8000_connect(db, source="127.0.0.4")
                try:
                    assert await _query(live, "SELECT 1") == [[1]]
                    redis.stop()
                    before = roles_with_prefix(pg, PREFIX)
                    err = await _refused(env, db, source="127.0.0.5")
                    assert err.get("C") == "08004", err
                    assert roles_with_prefix(pg, PREFIX) <= before  # none created (the reaper may drop leftovers)
                    # The live session goes on.
                    assert await _query(live, "SELECT v FROM public.t WHERE id = 1") == [["one"]]
                    redis.start()
                    # A fresh identity (127.0.0.5's refusal is cached for 5 s).
                    await _works(env, db, source="127.0.0.6")
                    assert await _query(live, "SELECT 2") == [[2]]
                finally:
                    await _close(live)
    finally:
        redis.stop()
