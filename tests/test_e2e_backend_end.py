"""A session's end is its backend's end: however a relayed session ends, no backend of it is
left in ``pg_stat_activity`` (polled with a bound) and the statement it ran has stopped (rows
stop arriving in the table its loop writes to).

Ways covered: the client killed (SIGKILL) or its socket dropped (RST) during
``select pg_sleep(30)`` and during a ``DO`` loop that inserts and commits; the FATAL of each
limit; revocation (with a direct login of the same role, and a backend of another instance);
an identity change; a downgrade (the statement started with the old privileges is
cancelled); the drain deadline; Waypoint killed and restarted (the start sweep). Also: the
connection limits hold against backends, and a tightened limit ends open sessions.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trio
from e2e_support import (
    E2EEnv,
    RawSession,
    backend_state,
    create_app_database,
    db_rule,
    e2e_env,
    make_config_text,
    run_waypoint,
    standin_process,
    wait_running,
)
from localapi_standin import run_standin
from pgcluster import PgCluster
from state_support import KeySpace, free_port

from waypoint.app import Running
from waypoint.config.load import load_config_text

WAYPOINT = Path(sys.executable).with_name("waypoint")

# Every wait is bounded; none of these is a timing claim (the backend end's own bound is 2 s).
GONE_BOUND = 20.0
LOOP = (
    "DO $$ BEGIN LOOP "
    "INSERT INTO public.t VALUES ((SELECT pg_catalog.max(id) + 1 FROM public.t), 'loop'); "
    "COMMIT; PERFORM pg_catalog.pg_sleep(0.2); END LOOP; END $$"
)
# The same loop, sending the client a notice of 2000 bytes per round (for the byte limit).
NOISY_LOOP = LOOP.replace("COMMIT;", "COMMIT; RAISE NOTICE '%', pg_catalog.repeat('n', 2000);")
SLEEP = "select pg_catalog.pg_sleep(30)"


# --- helpers -------------------------------------------------------------------------------------


async def wait_gone(cluster: PgCluster, pid: int) -> None:
    """Until backend ``pid`` is no longer in pg_stat_activity (bounded)."""
    state: tuple[str, str] | None = None
    with trio.move_on_after(GONE_BOUND):
        while True:
            state = await trio.to_thread.run_sync(backend_state, cluster, pid)
            if state is None:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"backend {pid} still in pg_stat_activity: {state}")


def _count(cluster: PgCluster, db: str) -> int:
    return int(cluster.execute("SELECT pg_catalog.count(*) FROM public.t", dbname=db)[0][0])


async def wait_rows(cluster: PgCluster, db: str, at_least: int) -> None:
    with trio.fail_after(GONE_BOUND):
        while await trio.to_thread.run_sync(_count, cluster, db) < at_least:
            await trio.sleep(0.05)


async def assert_rows_stopped(cluster: PgCluster, db: str) -> None:
    """The loop is over: no row arrives over five of its rounds."""
    before = await trio.to_thread.run_sync(_count, cluster, db)
    await trio.sleep(1.0)
    after = await trio.to_thread.run_sync(_count, cluster, db)
    assert after == before, f"rows still arriving: {before} -> {after}"


def role_backends(cluster: PgCluster, role: str) -> list[int]:
    rows = cluster.execute(
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE usename = :role ORDER BY 1", role=role
    )
    return [int(r[0]) for r in rows]


def drop(session: RawSession) -> None:
    """The client vanishes: its socket is reset (no Terminate, no FIN)."""
    session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    session.sock.close()


async def open_raw(env: E2EEnv, db: str, source: str) -> RawSession:
    return await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source=source))


async def read_fatal(session: RawSession) -> dict[str, str]:
    return await trio.to_thread.run_sync(lambda: session.read_until_closed(timeout=15))


def ends(running: Running, reason: str, how: str | None = None) -> float:
    total = 0.0
    for metric in running.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name != "waypoint_backend_ends_total":
                continue
            if sample.labels.get("reason") == reason and how in (None, sample.labels.get("how")):
                total += sample.value
    return total


async def wait_metric(running: Running, reason: str, how: str | None = None) -> None:
    with trio.fail_after(GONE_BOUND):
        while ends(running, reason, how) < 1:
            await trio.sleep(0.05)


RW = {"permissions": ["readwrite"]}
RO = {"permissions": ["readonly"]}


# --- the client goes ----------------------------------------------------------------------------


@pytest.mark.parametrize("statement", [SLEEP, LOOP], ids=["sleep", "insert_loop"])
async def test_client_killed_ends_backend(pg: PgCluster, tmp_path: Path, statement: str) -> None:
    db = create_app_database(pg)
    app = f"wp-kill-{secrets.token_hex(4)}"
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: RW})
        # The caller turns the server's own client check off: nothing relies on it.
        cmd = [
            str(pg.binary("psql")),
            env.dsn(db, application_name=app),
            "-X",
            "-c",
            "SET client_connection_check_interval = 0",
            "-c",
            statement,
        ]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            with trio.fail_after(GONE_BOUND):
                while True:
                    rows = await trio.to_thread.run_sync(
                        lambda: pg.execute(
                            "SELECT pid FROM pg_catalog.pg_stat_activity "
                            "WHERE application_name = :app AND state = 'active'",
                            app=app,
                        )
                    )
                    if rows:
                        pid = int(rows[0][0])
                        break
                    await trio.sleep(0.05)
            if statement == LOOP:
                await wait_rows(pg, db, 3)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            await wait_gone(pg, pid)
            await assert_rows_stopped(pg, db)
            await wait_metric(env.running, "client_closed", "cancel")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await env.assert_clean()


@pytest.mark.parametrize("statement", [SLEEP, LOOP], ids=["sleep", "insert_loop"])
async def test_client_dropped_ends_backend(pg: PgCluster, tmp_path: Path, statement: str) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.2", {db: RW})
        raw = await open_raw(env, db, "127.0.0.2")
        # The first line of defence is set on the role (not relied upon).
        interval = await trio.to_thread.run_sync(
            lambda: raw.read_result_of("show client_connection_check_interval")
        )
        assert interval == "ok:5s", interval
        off = "SET client_connection_check_interval = 0"
        assert await trio.to_thread.run_sync(lambda: raw.read_result_of(off)) == ""
        raw.send_query(statement)
        await wait_running(pg, raw.pid, statement[:20])
        if statement == LOOP:
            await wait_rows(pg, db, 3)
        drop(raw)
        await wait_gone(pg, raw.pid)
        await assert_rows_stopped(pg, db)
        await env.assert_clean()


async def test_statement_that_swallows_cancel_is_terminated_by_the_admin(
    pg: PgCluster, tmp_path: Path
) -> None:
    """A loop that catches query_canceled and never reads its client: neither Terminate nor
    CancelRequest stops it; the admin's pg_terminate_backend does."""
    db = create_app_database(pg)
    stubborn = (
        "DO $$ BEGIN LOOP "
        "INSERT INTO public.t VALUES ((SELECT pg_catalog.max(id) + 1 FROM public.t), 'loop'); "
        "COMMIT; "
        "BEGIN PERFORM pg_catalog.pg_sleep(0.2); EXCEPTION WHEN query_canceled THEN NULL; END; "
        "END LOOP; END $$"
    )
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.15", {db: RW})
        raw = await open_raw(env, db, "127.0.0.15")
        off = "SET client_connection_check_interval = 0"
        assert await trio.to_thread.run_sync(lambda: raw.read_result_of(off)) == ""
        raw.send_query(stubborn)
        await wait_running(pg, raw.pid, "query_canceled")
        await wait_rows(pg, db, 3)
        drop(raw)
        await wait_gone(pg, raw.pid)
        await assert_rows_stopped(pg, db)
        await wait_metric(env.running, "client_closed", "pg_terminate_backend")
        await env.assert_clean()


# --- Waypoint ends the session ------------------------------------------------------------------


async def test_limit_fatals_end_backends(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.3", rules=[db_rule({db: RO}, limits={"max_conn_duration": "2s"})])
        env.grant("127.0.0.4", rules=[db_rule({db: RW}, limits={"max_bytes_per_conn": 30000})])
        timed = await open_raw(env, db, "127.0.0.3")
        noisy = await open_raw(env, db, "127.0.0.4")
        try:
            timed.send_query(SLEEP)
            noisy.send_query(NOISY_LOOP)
            err = await read_fatal(timed)
            assert err.get("C") == "53400" and "max_conn_duration" in err.get("M", ""), err
            await wait_gone(pg, timed.pid)
            err = await read_fatal(noisy)
            assert err.get("C") == "53400" and "max_bytes_per_conn" in err.get("M", ""), err
            await wait_gone(pg, noisy.pid)
            await assert_rows_stopped(pg, db)
            await wait_metric(env.running, "max_conn_duration")
            await wait_metric(env.running, "byte_limit")
        finally:
            timed.close()
            noisy.close()
        await env.assert_clean()


async def test_revocation_ends_every_backend_of_the_role(pg: PgCluster, tmp_path: Path) -> None:
    """Revocation acts on the role: the session's backend, and a direct login the caller made
    with a password it set itself, both end; the loop stops."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        env.grant("127.0.0.5", {db: RW})
        raw = await open_raw(env, db, "127.0.0.5")
        password = f"self-set-{secrets.token_hex(8)}"
        assert (
            await trio.to_thread.run_sync(
                lambda: raw.read_result_of(f"ALTER ROLE CURRENT_USER PASSWORD '{password}'")
            )
            == ""
        )
        raw.send_query(LOOP)
        role = await wait_running(pg, raw.pid, "LOOP")

        def direct() -> pg8000.native.Connection:
            return pg8000.native.Connection(
                user=role, password=password, host=pg.host, port=pg.port, database=db, timeout=30
            )

        other = await trio.to_thread.run_sync(direct)
        other_pid = int(other.run("SELECT pg_catalog.pg_backend_pid()")[0][0])
        try:
            await wait_rows(pg, db, 3)
            env.grant("127.0.0.5", rules=[db_rule({db: RO}, listener="elsewhere")])
            err = await read_fatal(raw)
            assert err.get("C") == "28000" and "access revoked" in err.get("M", ""), err
            await wait_gone(pg, raw.pid)
            await wait_gone(pg, other_pid)
            await assert_rows_stopped(pg, db)
            await wait_metric(env.running, "access_revoked")
            await wait_metric(env.running, "access_revoked_role", "pg_terminate_backend")
        finally:
            raw.close()
            with contextlib.suppress(Exception):
                other.close()
        await env.assert_clean()


async def test_identity_change_ends_backend(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        env.grant("127.0.0.6", {db: RW})
        raw = await open_raw(env, db, "127.0.0.6")
        try:
            raw.send_query(LOOP)
            await wait_running(pg, raw.pid, "LOOP")
            await wait_rows(pg, db, 3)
            env.grant("127.0.0.6", {db: RW}, login="someone-else@example.com")
            err = await read_fatal(raw)
            assert err.get("C") == "28000" and "another identity" in err.get("M", ""), err
            await wait_gone(pg, raw.pid)
            await assert_rows_stopped(pg, db)
            await wait_metric(env.running, "identity_changed")
        finally:
            raw.close()
        await env.assert_clean()


async def test_downgrade_cancels_statement_started_with_old_privileges(
    pg: PgCluster, tmp_path: Path
) -> None:
    """One INSERT ... SELECT passed its privilege check under readwrite; after the downgrade
    it is cancelled (it would otherwise commit its rows), and the session goes on. On 15,
    where the session may have switched to the group it left, the session ends instead."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        env.grant("127.0.0.7", {db: RW})
        raw = await open_raw(env, db, "127.0.0.7")
        try:
            raw.send_query(
                "INSERT INTO public.t SELECT g, 'slow' FROM pg_catalog.generate_series(100, 250) "
                "AS g WHERE pg_catalog.pg_sleep(0.2) IS NOT NULL"
            )
            await wait_running(pg, raw.pid, "generate_series")
            env.grant("127.0.0.7", {db: RO})
            if pg.version < 16:
                assert (await read_fatal(raw)).get("C") == "28000"
                await wait_gone(pg, raw.pid)
                assert await trio.to_thread.run_sync(_count, pg, db) == 1
            else:
                result = await trio.to_thread.run_sync(lambda: raw.read_result(timeout=15))
                assert result.startswith("error:57014:"), result
                assert await trio.to_thread.run_sync(_count, pg, db) == 1
                ok = await trio.to_thread.run_sync(lambda: raw.read_result_of("select 1"))
                assert ok == "ok:1"
        finally:
            raw.close()
        await env.assert_clean()


async def test_drain_deadline_ends_backend(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, drain_timeout="1s") as env:
        env.grant("127.0.0.8", {db: RW})
        raw = await open_raw(env, db, "127.0.0.8")
        try:
            raw.send_query(LOOP)
            await wait_running(pg, raw.pid, "LOOP")
            await wait_rows(pg, db, 3)
            env.running.shutdown()
            err = await read_fatal(raw)
            assert err.get("C") == "57P01", err
            await wait_gone(pg, raw.pid)
            await assert_rows_stopped(pg, db)
            assert ends(env.running, "drain_deadline") == 1
        finally:
            raw.close()


# --- limits -------------------------------------------------------------------------------------


async def test_limits_hold_against_backends(pg: PgCluster, tmp_path: Path) -> None:
    """Two clients killed mid-statement under max_conns = 2: the next two sessions get their
    slots only once the old backends are gone, so the role never has more than 2."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.9", rules=[db_rule({db: RO}, limits={"max_conns": 2})])
        old = [await open_raw(env, db, "127.0.0.9") for _ in range(2)]
        for raw in old:
            raw.send_query(SLEEP)
        role = ""
        for raw in old:
            role = await wait_running(pg, raw.pid, "pg_sleep")
        for raw in old:
            drop(raw)
        new: list[RawSession] = []
        try:
            with trio.fail_after(GONE_BOUND):
                while len(new) < 2:
                    try:
                        new.append(await open_raw(env, db, "127.0.0.9"))
                    except AssertionError as exc:  # refused while the old slots are held
                        assert "53300" in str(exc), exc
                        await trio.sleep(0.05)
            pids = await trio.to_thread.run_sync(role_backends, pg, role)
            assert sorted(pids) == sorted(r.pid for r in new), (pids, [r.pid for r in old])
        finally:
            for raw in new:
                raw.close()
        await env.assert_clean()


async def test_tightened_limits_end_open_sessions(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        env.grant("127.0.0.10", rules=[db_rule({db: RO}, limits={"max_conns": 3})])
        env.grant("127.0.0.11", rules=[db_rule({db: RO}, limits={"max_conn_duration": "1h"})])
        env.grant("127.0.0.12", {db: RO})
        many = [await open_raw(env, db, "127.0.0.10") for _ in range(3)]
        idle = await open_raw(env, db, "127.0.0.11")
        chatty = await open_raw(env, db, "127.0.0.12")
        try:
            got = await trio.to_thread.run_sync(
                lambda: chatty.read_result_of("select pg_catalog.repeat('x', 5000)")
            )
            assert got == "ok:" + "x" * 5000
            env.grant("127.0.0.10", rules=[db_rule({db: RO}, limits={"max_conns": 1})])
            env.grant("127.0.0.11", rules=[db_rule({db: RO}, limits={"max_conn_duration": "1s"})])
            env.grant("127.0.0.12", rules=[db_rule({db: RO}, limits={"max_bytes_per_conn": 4000})])
            for raw in many[1:]:  # the newest two
                err = await read_fatal(raw)
                assert err.get("C") == "53400" and "max_conns (1)" in err.get("M", ""), err
            err = await read_fatal(idle)
            assert err.get("C") == "53400" and "max_conn_duration" in err.get("M", ""), err
            err = await read_fatal(chatty)
            assert err.get("C") == "53400" and "max_bytes_per_conn" in err.get("M", ""), err
            for raw in (*many[1:], idle, chatty):
                await wait_gone(pg, raw.pid)
            # The oldest session is within the new limit and goes on.
            assert (
                await trio.to_thread.run_sync(lambda: many[0].read_result_of("select 1")) == "ok:1"
            )
        finally:
            for raw in (*many, idle, chatty):
                raw.close()
        await env.assert_clean()


# --- another instance, Waypoint killed ------------------------------------------------------------


async def test_revocation_on_one_instance_ends_backend_of_another(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    """Instance B runs a session's loop; instance A starts after it: A's start sweep leaves
    B's backend alone (the caller holds a slot in Redis). A revalidates, B does not: A's
    revocation ends the role's backend behind B's session too."""
    db = create_app_database(pg)
    state = redis_space.toml()
    async with run_standin(tmp_path) as standin:

        def config(interval: str) -> Any:
            text = make_config_text(
                pg,
                socket_path=standin.socket_path,
                tables_extra=state,
                revalidation_interval=interval,
            )
            return load_config_text(text, source="multi.toml")

        ip = "127.0.0.13"
        standin.set_peer(ip, login="fay@example.com", node="fay-pc", rules=[db_rule({db: RW})])
        async with run_waypoint(config("0s")) as b:
            via_b = await open_raw(E2EEnv(pg, standin, b, config("0s")), db, ip)
            try:
                via_b.send_query(LOOP)
                await wait_running(pg, via_b.pid, "LOOP")
                await wait_rows(pg, db, 3)
                async with run_waypoint(config("1s")) as a:
                    # A's start sweep ran before it accepted: B's session is not an orphan.
                    await wait_rows(pg, db, await trio.to_thread.run_sync(_count, pg, db) + 3)
                    assert await trio.to_thread.run_sync(backend_state, pg, via_b.pid) is not None
                    via_a = await open_raw(E2EEnv(pg, standin, a, config("1s")), db, ip)
                    try:
                        standin.set_peer(
                            ip,
                            login="fay@example.com",
                            node="fay-pc",
                            rules=[db_rule({db: RW}, listener="elsewhere")],
                        )
                        err = await read_fatal(via_a)
                        assert err.get("C") == "28000", err
                        await wait_gone(pg, via_a.pid)
                        await wait_gone(pg, via_b.pid)
                        await assert_rows_stopped(pg, db)
                    finally:
                        via_a.close()
            finally:
                via_b.close()


def _start_waypoint(config: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [str(WAYPOINT), "run", "-c", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    out.close()
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)


async def test_waypoint_killed_then_restarted_ends_orphans(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    port = free_port()
    gil = {"ip": "127.0.0.14", "login": "gil@example.com", "node": "gil-pc", "rules": [db_rule({db: RW})]}
    with standin_process(tmp_path, [gil]) as sock:
        config = tmp_path / "wp.toml"
        config.write_text(make_config_text(pg, socket_path=sock, listen=f"127.0.0.1:{port}"))
        log = tmp_path / "wp.log"
        procs = [_start_waypoint(config, log, port)]
        env = type("E", (), {"host": "127.0.0.1", "port": port})()
        raw: RawSession = await trio.to_thread.run_sync(
            lambda: RawSession.open(env, db, source="127.0.0.14")  # type: ignore[arg-type]
        )
        try:
            # Off, as a caller may set it: the server alone would never notice Waypoint's end.
            off = "SET client_connection_check_interval = 0"
            assert await trio.to_thread.run_sync(lambda: raw.read_result_of(off)) == ""
            raw.send_query(LOOP)
            await wait_running(pg, raw.pid, "LOOP")
            await wait_rows(pg, db, 3)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            # Nothing ended the loop: it runs on, orphaned.
            await wait_rows(pg, db, await trio.to_thread.run_sync(_count, pg, db) + 2)
            procs.append(await trio.to_thread.run_sync(_start_waypoint, config, log, port))
            await wait_gone(pg, raw.pid)
            await assert_rows_stopped(pg, db)
            assert "orphan_backends_ended" in log.read_text()
        finally:
            raw.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
