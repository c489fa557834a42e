"""Session pooling per provisioned role, end to end on PostgreSQL 15 and 18.

Each kind of session state set by one connection is absent in the next one that gets the same
backend (the same ``pg_backend_pid()``); a client that leaves in a transaction, in COPY or
after an error leaves nothing committed and no backend in the pool; the previous client's
cancel key cancels nothing; two identities never share a backend; a downgrade closes the
role's pooled backends; the pool's bounds hold. Every wait is bounded and polls the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import struct
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
import trio
from e2e_support import (
    LISTENER,
    E2EEnv,
    RawSession,
    create_app_database,
    db_rule,
    e2e_env,
    roles_with_prefix,
)
from pgcluster import PgCluster
from state_support import KeySpace
from test_e2e_cancel import _send_cancel, cancel_outcomes

RW = {"permissions": ["readwrite"]}
RO = {"permissions": ["readonly"]}
BOUND = 20.0


def _role_pids(cluster: PgCluster, role: str) -> set[int]:
    rows = cluster.execute(
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE usename = :role", role=role
    )
    return {int(r[0]) for r in rows}


async def wait_pids(cluster: PgCluster, role: str, check: Callable[[set[int]], bool]) -> set[int]:
    """Poll ``pg_stat_activity`` until the role's backends satisfy ``check`` (bounded)."""
    with trio.fail_after(BOUND):
        while True:
            pids = await trio.to_thread.run_sync(_role_pids, cluster, role)
            if check(pids):
                return pids
            await trio.sleep(0.05)


def _psycopg(dsn: str, statements: list[str]) -> list[Any]:
    """One connection: each statement's first row's first value (or its error's SQLSTATE)."""
    out: list[Any] = []
    with psycopg.connect(dsn, connect_timeout=20, autocommit=True) as conn:
        for sql in statements:
            try:
                cur = conn.execute(sql)
                row = cur.fetchone() if cur.description is not None else None
                out.append(row[0] if row else None)
            except psycopg.Error as exc:
                out.append(f"error:{exc.sqlstate}")
    return out


async def session(env: E2EEnv, db: str, statements: list[str]) -> list[Any]:
    return await trio.to_thread.run_sync(_psycopg, env.dsn(db), statements)


async def pid_and_role(env: E2EEnv, db: str, source: str) -> tuple[int, str]:
    """The backend pid and role of a connection from ``source`` (pg8000 binds the source
    address, which picks the identity)."""
    conn = await env.pg8000_connect(db, source=source)
    try:
        row = conn.run("SELECT pg_catalog.pg_backend_pid(), current_user")[0]
        return int(row[0]), str(row[1])
    finally:
        conn.close()


def _pooled(env: E2EEnv) -> int:
    service = env.running._service
    assert service is not None
    return len(service.pool.book)


async def wait_pooled(env: E2EEnv, count: int) -> None:
    with trio.fail_after(BOUND):
        while _pooled(env) != count:
            await trio.sleep(0.02)


STATE = [
    "SELECT pg_catalog.pg_backend_pid()",
    "CREATE TEMP TABLE scratch (x int)",
    "PREPARE stmt AS SELECT 1",
    "SET work_mem = '7MB'",
    "SET search_path = pg_temp, public",
    "SET application_name = 'first-client'",
    "SET SESSION AUTHORIZATION DEFAULT",
    "SET ROLE NONE",
    "SELECT pg_catalog.pg_advisory_lock(4242)",
    "LISTEN first_channel",
    "BEGIN",
    "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
    "COMMIT",
    "SELECT pg_catalog.nextval('public.seq')",
    "SELECT pg_catalog.current_setting('work_mem')",
]
CHECK = [
    "SELECT pg_catalog.pg_backend_pid()",
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_class WHERE relname = 'scratch'"
    " AND relpersistence = 't'",
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements",
    "SELECT pg_catalog.current_setting('work_mem')",
    "SELECT pg_catalog.current_setting('search_path')",
    "SELECT pg_catalog.current_setting('application_name')",
    "SELECT session_user = current_user",
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
    " AND pid = pg_catalog.pg_backend_pid()",
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()",
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors",
    "SELECT pg_catalog.currval('public.seq')",
]


def _make_sequence(cluster: PgCluster, db: str) -> None:
    cluster.execute(
        f"SET ROLE {cluster.admin_user}; CREATE SEQUENCE public.seq; "
        "GRANT USAGE, SELECT ON SEQUENCE public.seq TO PUBLIC",
        dbname=db,
    )


async def test_the_next_connection_gets_the_same_backend_and_none_of_the_state(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    _make_sequence(pg, db)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        first = await session(env, db, STATE)
        assert not any(isinstance(v, str) and v.startswith("error") for v in first), first
        assert first[-1] == "7MB"
        await wait_pooled(env, 1)
        second = await session(env, db, CHECK)
    pid, temp, prepared, work_mem, path, app, auth, locks, channels, cursors, currval = second
    assert pid == first[0]  # the same backend
    assert (temp, prepared, locks, channels, cursors) == (0, 0, 0, 0, 0)
    assert work_mem != "7MB" and path != "pg_temp, public" and app != "first-client"
    assert auth is True
    assert currval == "error:55000"  # currval of sequence "seq" is not yet defined


async def test_psql_and_asyncpg_get_the_pooled_backend_clean(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        r = await env.psql(
            "select pg_catalog.pg_backend_pid()\ncreate temp table psql_scratch (x int)\n"
            "set work_mem = '9MB'",
            db,
        )
        assert r.returncode == 0, r.stderr
        pid = int(r.stdout.split()[0])
        await wait_pooled(env, 1)
        r = await env.psql(
            "select pg_catalog.pg_backend_pid(), pg_catalog.current_setting('work_mem'),"
            " pg_catalog.to_regclass('pg_temp.psql_scratch') is null",
            db,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{pid}|4MB|t"
        await wait_pooled(env, 1)

        async def via_asyncpg() -> tuple[int, str]:
            conn = await asyncpg.connect(
                host=env.host, port=env.port, user="a", database=db, ssl=False, timeout=20
            )
            try:
                row = await conn.fetchrow(
                    "select pg_catalog.pg_backend_pid(), pg_catalog.current_setting('work_mem')",
                    timeout=20,
                )
                await conn.execute("set work_mem = '11MB'", timeout=20)
                return int(row[0]), str(row[1])
            finally:
                await conn.close(timeout=20)

        def run_asyncpg() -> tuple[int, str]:
            return asyncio.run(asyncio.wait_for(via_asyncpg(), 60))

        # asyncpg sends other startup parameters than psql: another key, its own backend.
        first = await trio.to_thread.run_sync(run_asyncpg)
        assert first[0] != pid and first[1] == "4MB"
        await wait_pooled(env, 2)
        again = await trio.to_thread.run_sync(run_asyncpg)
        assert again == first  # its SET is gone


@pytest.mark.parametrize(
    ("how", "statements"),
    [
        ("transaction", ["BEGIN", "INSERT INTO public.t VALUES (50, 'uncommitted')"]),
        ("error", ["BEGIN", "INSERT INTO public.t VALUES (50, 'uncommitted')", "SELECT 1/0"]),
    ],
)
async def test_a_client_that_leaves_mid_transaction_commits_nothing_and_pools_nothing(
    pg: PgCluster, tmp_path: Path, how: str, statements: list[str]
) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        role = (await session(env, db, ["SELECT current_user"]))[0]
        await wait_pooled(env, 1)

        def leave() -> int:
            conn = psycopg.connect(env.dsn(db), connect_timeout=20)  # not autocommit
            pid = int(conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            for sql in statements[1:]:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(sql)
            conn.close()  # psycopg sends Terminate, inside the transaction
            return pid

        pid = await trio.to_thread.run_sync(leave)
        await wait_pids(pg, role, lambda pids: pid not in pids)
        assert _pooled(env) == 0
        rows = pg.execute("SELECT count(*) FROM public.t WHERE id = 50", dbname=db)
        assert rows[0][0] == 0


async def test_a_client_that_leaves_in_copy_pools_nothing(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})

        def leave_in_copy() -> int:
            raw = RawSession.open(env, db)
            raw.send_query("COPY public.t FROM STDIN")
            kind, _ = raw.read_message()
            assert kind == b"G"  # CopyInResponse
            data = b"60\tcopy\n"
            raw.sock.sendall(b"d" + struct.pack("!i", 4 + len(data)) + data)
            pid = raw.pid
            raw.close()  # Terminate in COPY
            return pid

        pid = await trio.to_thread.run_sync(leave_in_copy)
        role = (await session(env, db, ["SELECT current_user"]))[0]
        await wait_pids(pg, role, lambda pids: pid not in pids)
        rows = pg.execute("SELECT count(*) FROM public.t WHERE id = 60", dbname=db)
        assert rows[0][0] == 0


@pytest.mark.parametrize("minor", [0, 2])
async def test_the_previous_clients_cancel_key_cancels_nothing(
    pg: PgCluster, tmp_path: Path, minor: int
) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        first = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, minor))
        old_pid, old_secret = first.pid, first.secret
        await trio.to_thread.run_sync(first.close)
        await wait_pooled(env, 1)
        second = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, minor))
        assert second.pid == old_pid  # the same backend, a key of its own
        assert second.secret != old_secret
        expected = 32 if (minor == 2 and pg.version >= 18) else 4
        assert len(second.secret) == len(old_secret) == expected
        second.send_query("select pg_catalog.pg_sleep(60)")
        with trio.fail_after(BOUND):
            while True:
                rows = pg.execute(
                    "SELECT state FROM pg_catalog.pg_stat_activity WHERE pid = :pid", pid=old_pid
                )
                if rows and rows[0][0] == "active":
                    break
                await trio.sleep(0.05)
        await trio.to_thread.run_sync(_send_cancel, env, old_pid, old_secret)
        with trio.fail_after(BOUND):
            while cancel_outcomes(env).get("unknown_key", 0) < 1:
                await trio.sleep(0.02)
        rows = pg.execute(
            "SELECT state FROM pg_catalog.pg_stat_activity WHERE pid = :pid", pid=old_pid
        )
        assert rows and rows[0][0] == "active"  # the old key cancelled nothing
        # The client's own key does (the mapping reaches the backend's real key).
        await trio.to_thread.run_sync(_send_cancel, env, second.pid, second.secret)
        result = await trio.to_thread.run_sync(lambda: second.read_result(timeout=BOUND))
        assert result.startswith("error:57014"), result
        second.close()


async def test_a_pooled_backend_the_server_ended_is_replaced_unseen(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The server ends the pooled backend while it waits: the next client gets a new one, and
    sees no error (the hand-out's check caught the FATAL and the end of the stream)."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        pid, role = await session(
            env, db, ["SELECT pg_catalog.pg_backend_pid()", "SELECT current_user"]
        )
        await wait_pooled(env, 1)
        await trio.to_thread.run_sync(
            lambda: pg.execute("SELECT pg_catalog.pg_terminate_backend(:pid)", pid=pid)
        )
        await wait_pids(pg, role, lambda pids: pid not in pids)
        new_pid, answer = await session(env, db, ["SELECT pg_catalog.pg_backend_pid()", "SELECT 1"])
        assert new_pid != pid and answer == 1
        await wait_pooled(env, 1)
        assert await session(env, db, ["SELECT pg_catalog.pg_backend_pid()"]) == [new_pid]


async def test_two_identities_never_share_a_backend(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        env.grant("127.0.0.2", {db: RW})

        a_pid, a_role = await pid_and_role(env, db, "127.0.0.1")
        await wait_pooled(env, 1)
        b_pid, b_role = await pid_and_role(env, db, "127.0.0.2")
        assert a_role != b_role and a_pid != b_pid
        await wait_pooled(env, 2)
        assert await pid_and_role(env, db, "127.0.0.1") == (a_pid, a_role)
        assert await pid_and_role(env, db, "127.0.0.2") == (b_pid, b_role)


async def test_a_downgrade_closes_the_roles_pooled_backends(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        pid, role = await session(
            env, db, ["SELECT pg_catalog.pg_backend_pid()", "SELECT current_user"]
        )
        await wait_pooled(env, 1)
        env.grant("127.0.0.1", {db: RO})
        new_pid, new_role, denied = await session(
            env,
            db,
            [
                "SELECT pg_catalog.pg_backend_pid()",
                "SELECT current_user",
                "INSERT INTO public.t VALUES (70, 'x')",
            ],
        )
        assert new_role == role and new_pid != pid
        assert denied == "error:42501"
        await wait_pids(pg, role, lambda pids: pid not in pids)


async def test_bounds_per_role_and_idle_timeout(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    extra = 'pool_max_per_role = 1\npool_idle_timeout = "1s"'
    async with e2e_env(pg, tmp_path, listener_extra=extra) as env:
        env.grant("127.0.0.1", {db: RW})

        def two_at_once() -> tuple[int, int, str]:
            with (
                psycopg.connect(env.dsn(db), autocommit=True, connect_timeout=20) as a,
                psycopg.connect(env.dsn(db), autocommit=True, connect_timeout=20) as b,
            ):
                pa = a.execute("SELECT pg_catalog.pg_backend_pid(), current_user").fetchone()
                pb = b.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()
                assert pa is not None and pb is not None
                return int(pa[0]), int(pb[0]), str(pa[1])

        pa, pb, role = await trio.to_thread.run_sync(two_at_once)
        # Both ended cleanly; one is kept, the other closed (pool_max_per_role = 1)...
        pids = await wait_pids(pg, role, lambda p: len(p) == 1)
        assert pids <= {pa, pb}
        # ... and it is closed once idle for pool_idle_timeout.
        await wait_pids(pg, role, lambda p: not p)
        assert _pooled(env) == 0
        closes = {
            s.labels["reason"]: s.value
            for fam in env.running.metrics.registry.collect()
            if fam.name == "waypoint_pool_closes"
            for s in fam.samples
            if s.name.endswith("_total")
        }
        assert closes.get("max_per_role") == 1 and closes.get("idle_timeout") == 1


async def test_pool_off_ends_every_backend(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, listener_extra="pool = false") as env:
        env.grant("127.0.0.1", {db: RW})
        pid, role = await session(
            env, db, ["SELECT pg_catalog.pg_backend_pid()", "SELECT current_user"]
        )
        await wait_pids(pg, role, lambda pids: pid not in pids)
        raw = await trio.to_thread.run_sync(lambda: RawSession.open(env, db))
        assert raw.pid != pid
        raw.close()
        assert _pooled(env) == 0


async def test_roles_list_shows_pooled_backends_apart_from_live_sessions(
    pg: PgCluster, tmp_path: Path
) -> None:
    from waypoint.cli.main import main
    from waypoint.config import render_config

    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        (role,) = await session(env, db, ["SELECT current_user"])
        await wait_pooled(env, 1)
        path = tmp_path / "roles.toml"
        path.write_text(render_config(env.config, mask_secrets=False))
        path.chmod(0o600)

        def roles_list() -> str:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["roles", "list", "-c", str(path), "--listener", LISTENER]) == 0
            return out.getvalue()

        text = await trio.to_thread.run_sync(roles_list)
    lines = text.splitlines()
    assert lines[1].split()[-4:] == ["LIVE", "POOLED", "GROUPS", "OWNS"]
    row = next(line for line in lines if line.startswith(role + " ")).split()
    assert row[-4:-2] == ["0", "1"], text  # no live session, one pooled backend


async def test_pgjdbc_gets_the_pooled_backend_clean(pg: PgCluster, tmp_path: Path) -> None:
    from console_support import jdbc

    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        first = await jdbc(
            env.host,
            env.port,
            "SELECT pg_catalog.pg_backend_pid()",
            "SET work_mem = '7MB'",
            "CREATE TEMP TABLE jdbc_scratch (x int)",
            db=db,
        )
        assert first[0] == "COLUMNS\tpg_backend_pid" and first[2:] == ["OK 0", "OK 0"], first
        pid = first[1].split("\t")[1]
        await wait_pooled(env, 1)
        second = await jdbc(
            env.host,
            env.port,
            "SELECT pg_catalog.pg_backend_pid(), pg_catalog.current_setting('work_mem'),"
            " pg_catalog.to_regclass('pg_temp.jdbc_scratch') IS NULL",
            db=db,
        )
        assert second[1].split("\t")[1:] == [pid, "4MB", "t"], second


async def test_a_pooled_backend_keeps_no_role_alive_past_its_ttl(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The role's VALID UNTIL passes: its pooled backend is closed (``role_closed``) and the
    reaper drops the role; a pooled backend is not a live session."""
    from test_e2e_reaper import connect, current_user, short_ttl_env

    db = create_app_database(pg)
    prefix = f"pl{os.getpid() % 100000}x_"
    async with short_ttl_env(pg, tmp_path, prefix) as env:
        env.grant("127.0.0.4", {db: RO})
        conn = await connect(env, db, "127.0.0.4")
        role = await current_user(conn)
        await trio.to_thread.run_sync(conn.close)
        await wait_pooled(env, 1)
        registry = env.running.metrics.registry
        with trio.fail_after(BOUND):
            while (
                registry.get_sample_value(
                    "waypoint_reaper_dropped_roles_total", {"listener": LISTENER}
                )
                or 0
            ) < 1 or role in await trio.to_thread.run_sync(roles_with_prefix, pg, prefix):
                await trio.sleep(0.1)
        closed = registry.get_sample_value(
            "waypoint_pool_closes_total", {"listener": LISTENER, "reason": "role_closed"}
        )
        assert closed == 1
        assert _pooled(env) == 0


async def test_cancel_mapping_across_two_instances_with_redis(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    """Redis holds each client's key sealed: instance B forwards a pooled client's cancel to
    the backend it reached through A, and the previous client's key, through B, cancels
    nothing."""
    from e2e_support import two_instances, wait_running
    from test_e2e_multi_instance import cancel_outcome, send_cancel

    db = create_app_database(pg)
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, b):
        standin.set_peer(
            "127.0.0.1", login="erin@example.com", node="erin-laptop", rules=[db_rule({db: RO})]
        )
        host, port = a.address(LISTENER)
        via_a = types.SimpleNamespace(host=host, port=port)
        first = await trio.to_thread.run_sync(lambda: RawSession.open(via_a, db, 2))  # type: ignore[arg-type]
        await trio.to_thread.run_sync(first.close)
        with trio.fail_after(BOUND):
            while a._service is None or len(a._service.pool.book) != 1:
                await trio.sleep(0.02)
        second = await trio.to_thread.run_sync(lambda: RawSession.open(via_a, db, 2))  # type: ignore[arg-type]
        assert second.pid == first.pid and second.secret != first.secret
        second.send_query("select pg_catalog.pg_sleep(60)")
        await wait_running(pg, second.pid, "pg_sleep")
        await send_cancel(b, first.pid, first.secret, "127.0.0.1")
        assert cancel_outcome(b, "unknown_key") == 1
        state = pg.execute("SELECT state FROM pg_stat_activity WHERE pid = :p", p=second.pid)
        assert state and state[0][0] == "active"
        await send_cancel(b, second.pid, second.secret, "127.0.0.1")
        result = await trio.to_thread.run_sync(lambda: second.read_result(timeout=BOUND))
        assert result.startswith("error:57014"), result
        assert cancel_outcome(b, "forwarded") == 1
        second.close()
