"""Real clients through Waypoint (docs/protocol.md): psql with sslmode disable / prefer /
require, psycopg 3, asyncpg, pg8000, pgjdbc and node-postgres, each with an arbitrary user
name, getting exactly the granted privileges; and the libpq-reachable preset cap
``options=-c waypoint.presets=...``. Every TLS session among them is asserted to have run its
record layer in C (``waypoint_client_tls_relays_total{record_layer="c"}``): a silent fallback
to the Python record layer fails these tests."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pg8000.native
import psycopg
import pytest
import trio
from console_support import pgjdbc_jar
from e2e_support import E2EEnv, RawSession, create_app_database, e2e_env, make_cert_files
from pgcluster import PgCluster

from waypoint.grants.naming import role_name
from waypoint.grants.presets import parse_preset_list

SYSTEM_PSQL = "/usr/bin/psql"  # libpq 15 with SSL (psql 18 of the wheel has none)


def _psycopg_session(dsn: str) -> tuple[str, bool, str]:
    with psycopg.connect(dsn, connect_timeout=20) as conn:
        user = conn.execute("select current_user").fetchone()
        row = conn.execute("select v from t where id = 1").fetchone()
        assert user is not None and row is not None
        try:
            conn.execute("insert into t values (50, 'x')")
        except psycopg.errors.InsufficientPrivilege as exc:
            denied = str(exc)
        else:  # pragma: no cover - the assertion below reports it
            denied = ""
        return str(user[0]), bool(conn.info.pgconn.ssl_in_use), str(row[0]) + "|" + denied


async def _asyncpg_session(host: str, port: int, db: str, ssl: str) -> tuple[str, str, str]:
    conn = await asyncpg.connect(
        host=host, port=port, user="whoever", database=db, ssl=ssl, timeout=20
    )
    try:
        assert conn._transport.get_extra_info("ssl_object") is not None
        user = await conn.fetchval("select current_user")
        v = await conn.fetchval("select v from t where id = $1", 1)
        try:
            await conn.execute("insert into t values (51, 'x')")
        except asyncpg.exceptions.InsufficientPrivilegeError as exc:
            denied = str(exc)
        else:  # pragma: no cover
            denied = ""
        return str(user), str(v), denied
    finally:
        await conn.close(timeout=5)


def _pg8000_session(env: E2EEnv, db: str) -> tuple[str, str]:
    conn = pg8000.native.Connection(
        user="any_name_at_all", host=env.host, port=env.port, database=db, timeout=20
    )
    try:
        rows = conn.run("select v from t where id = 1")
        try:
            conn.run("insert into t values (52, 'x')")
        except pg8000.native.DatabaseError as exc:
            denied = str(exc)
        else:  # pragma: no cover
            denied = ""
        return str(rows[0][0]), denied
    finally:
        conn.close()


async def test_every_client_gets_readonly_grant_select_ok_insert_denied(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(120):
        async with e2e_env(
            pg, tmp_path, tls_mode="optional", listener_extra=certs.listener_extra()
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login="carol@example.com")
            for sslmode, tls in (("disable", False), ("prefer", True), ("require", True)):
                r = await env.psql(
                    "select current_user, v from t\n\\conninfo",
                    db,
                    sslmode=sslmode,
                    binary=SYSTEM_PSQL,
                    user=f"random_{sslmode}",
                )
                assert r.returncode == 0, (sslmode, r.stderr)
                assert "wp_pg_main_carol_example_com" in r.stdout
                assert "|one" in r.stdout
                assert ("SSL connection" in r.stdout) is tls, (sslmode, r.stdout)
                r = await env.psql(
                    "insert into t values (2, 'two')", db, sslmode=sslmode, binary=SYSTEM_PSQL
                )
                assert r.returncode != 0
                assert "permission denied for table t" in r.stderr, r.stderr

            user, ssl_in_use, rest = await trio.to_thread.run_sync(
                _psycopg_session, env.dsn(db, user="psycopg_user", sslmode="require")
            )
            assert user.startswith("wp_pg_main_carol_example_com")
            assert ssl_in_use
            assert rest.startswith("one|") and "permission denied for table t" in rest

            for asyncpg_ssl in ("prefer", "require"):
                user, v, denied = await trio.to_thread.run_sync(
                    asyncio.run, _asyncpg_session(env.host, env.port, db, asyncpg_ssl)
                )
                assert user.startswith("wp_pg_main_carol_example_com")
                assert v == "one"
                assert "permission denied for table t" in denied

            v, denied = await trio.to_thread.run_sync(_pg8000_session, env, db)
            assert v == "one"
            assert "permission denied for table t" in denied and "42501" in denied

            await env.assert_clean()
            # psql prefer and require (two sessions each), psycopg, asyncpg prefer and
            # require, pg8000 (TLS when the server offers it): every record layer ran in C.
            assert env.tls_record_layers() == {"c": 8}


@pytest.mark.parametrize("form", ["options", "startup_parameter"])
async def test_preset_option_caps_readwrite_grant_to_readonly(
    pg: PgCluster, tmp_path: Path, form: str
) -> None:
    db = create_app_database(pg)
    with trio.fail_after(90):
        async with e2e_env(pg, tmp_path) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readwrite"]}}, login="dave@example.com")
            if form == "options":
                r = await env.psql(
                    "select current_user\ninsert into t values (3, 'x')",
                    db,
                    options="'-c waypoint.presets=readonly'",
                )
                assert r.returncode != 0
                assert "permission denied for table t" in r.stderr, r.stderr
                role = r.stdout.strip().splitlines()[0]
            else:

                def _run() -> tuple[str, str]:
                    conn = pg8000.native.Connection(
                        user="x",
                        host=env.host,
                        port=env.port,
                        database=db,
                        timeout=20,
                        startup_params={"waypoint_presets": "readonly"},
                    )
                    try:
                        name = str(conn.run("select current_user")[0][0])
                        try:
                            conn.run("insert into t values (3, 'x')")
                        except pg8000.native.DatabaseError as exc:
                            return name, str(exc)
                        return name, ""
                    finally:
                        conn.close()

                role, denied = await trio.to_thread.run_sync(_run)
                assert "permission denied for table t" in denied
            expected = role_name(
                "wp_", "pg-main", "dave@example.com", "node1", db, parse_preset_list("readonly")
            )
            assert role == expected, (role, expected)
            assert expected.endswith("_preset_readonly") or len(expected.encode()) == 63
            # Without the cap the same identity writes.
            r = await env.psql("insert into t values (4, 'y')", db)
            assert r.returncode == 0, r.stderr
            await env.assert_clean()


async def test_one_log_line_per_connection_and_no_secret_in_logs(
    pg15: PgCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="waypoint")
    db = create_app_database(pg15)
    with trio.fail_after(60):
        async with e2e_env(pg15, tmp_path) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login="fay@example.com")
            r = await env.psql("select 1", db)
            assert r.returncode == 0, r.stderr
            r = await env.psql("select 1", "not_granted_db")
            assert r.returncode != 0
            await env.assert_clean()
    ends = [r for r in caplog.records if getattr(r, "wp_event", None) == "connection_end"]
    assert len(ends) == 2, [r.getMessage() for r in ends]
    fields = [getattr(r, "wp_fields", {}) for r in ends]
    # A session's line comes once its backend is gone, possibly after the next one's.
    by_outcome = {f["outcome"]: f for f in fields}
    assert sorted(by_outcome) == ["client_closed", "refused"], fields
    relayed = by_outcome["client_closed"]
    assert relayed["login"] == "fay@example.com" and relayed["bytes_out"] > 0
    # psql left cleanly, its backend idle: reset and kept in the pool (pool = true by default).
    assert relayed["backend_end"] == "pooled", relayed
    assert by_outcome["refused"]["sqlstate"] == "42501"
    text = "\n".join(
        f"{r.getMessage()} {getattr(r, 'wp_fields', {})} {r.exc_info}" for r in caplog.records
    )
    assert pg15.admin_password not in text
    assert "SCRAM-SHA-256$" not in text and "md5" not in text.lower().replace("md5sum", "")


async def test_a_client_that_sent_terminate_ended_its_session_whatever_the_backend_did(
    pg15: PgCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the pool the client's Terminate goes on to the backend, which closes at once;
    a client that waits for the end of the stream before it closes (as many drivers do) sees
    Waypoint close after the backend did. The client ended the session all the same: the
    line says ``client_closed``."""
    caplog.set_level(logging.INFO, logger="waypoint")
    db = create_app_database(pg15)
    with trio.fail_after(60):
        async with e2e_env(pg15, tmp_path, listener_extra="pool = false") as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login="fay@example.com")
            raw = await trio.to_thread.run_sync(RawSession.open, env, db)
            assert await trio.to_thread.run_sync(raw.read_result_of, "select 1") == "ok:1"

            def terminate_then_wait_for_the_end() -> bytes:
                raw.sock.sendall(b"X\0\0\0\4")
                raw.sock.settimeout(20)
                return raw.sock.recv(1)

            assert await trio.to_thread.run_sync(terminate_then_wait_for_the_end) == b""
            raw.sock.close()
            await env.assert_clean()
    [end] = [r for r in caplog.records if getattr(r, "wp_event", None) == "connection_end"]
    fields = getattr(end, "wp_fields", {})
    assert (fields["outcome"], fields["relay_end"]) == ("client_closed", "client_closed"), fields
    assert fields["backend_end"] == "terminate", fields


_PGJDBC_PROGRAM = Path(__file__).parent / "data" / "pgjdbc" / "TlsSession.java"


def _pgjdbc_session(url: str) -> list[str]:
    java = shutil.which("java")
    assert java is not None, "java not found (dev.sh installs default-jre-headless)"
    proc = subprocess.run(
        [java, "-cp", pgjdbc_jar(), str(_PGJDBC_PROGRAM), url],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


async def test_pgjdbc_with_sslmode_require(pg: PgCluster, tmp_path: Path) -> None:
    """pgjdbc (sslmode=require) through a listener that requires TLS: its session is relayed
    by the engine (the client TLS record layer in C), a result spanning many TLS records
    arrives whole, the grant holds."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(180):
        async with e2e_env(pg, tmp_path, tls_mode="require", listener_extra=certs.listener_extra()) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            url = f"jdbc:postgresql://{env.host}:{env.port}/{db}?user=jdbc_user&sslmode=require&connectTimeout=30"
            user, length, insert = await trio.to_thread.run_sync(_pgjdbc_session, url)
            assert user.startswith("wp_pg_main_")  # a role Waypoint provisioned, not jdbc_user
            assert length == str(20000 * 32)
            assert insert == "42501"
            await env.assert_clean()
            assert env.tls_record_layers() == {"c": 1}


NODE_DIR = Path(__file__).parent / "node"


def _node_session(spec: dict[str, object]) -> dict[str, object]:
    """tests/node/session.js with ``spec``: what it saw (it checks itself and exits non-zero
    on any mismatch, which fails here with its output)."""
    node = shutil.which("node")
    assert node is not None, "node not found (dev.sh installs nodejs)"
    assert (NODE_DIR / "node_modules" / "pg").is_dir(), (
        "node-postgres is not installed in tests/node: run ./dev.sh setup "
        "(or npm ci --prefix tests/node)"
    )
    proc = subprocess.run(
        [node, str(NODE_DIR / "session.js"), json.dumps(spec)],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL, cwd=NODE_DIR,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    result = json.loads(proc.stdout.splitlines()[-1])
    assert isinstance(result, dict) and result["problems"] == [], result
    seen = result["seen"]
    assert isinstance(seen, dict)
    return seen


async def test_node_postgres_with_sslmode_require_and_plaintext(pg: PgCluster, tmp_path: Path) -> None:
    """node-postgres (``ssl`` verified against the test CA: sslmode=require and more) through a
    listener that requires TLS, its record layer in C; then plaintext through a plaintext
    listener. Simple and extended (parameterized) queries, the grant holds (42501)."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    expect = {"value": "one", "role_prefix": "wp_pg_main_erin_example_com"}
    with trio.fail_after(180):
        async with e2e_env(pg, tmp_path, tls_mode="require", listener_extra=certs.listener_extra()) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login="erin@example.com")
            spec = {
                "host": env.host, "port": env.port, "database": db, "user": "node_user",
                "ssl": {"ca": certs.ca_pem.read_text()}, "expect": {**expect, "tls": True},
            }  # fmt: skip
            seen = await trio.to_thread.run_sync(_node_session, spec)
            assert seen["tls"] is True and seen["insert"] == "42501"
            await env.assert_clean()
            assert env.tls_record_layers() == {"c": 1}
        (tmp_path / "plain").mkdir()
        async with e2e_env(pg, tmp_path / "plain") as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login="erin@example.com")
            spec = {
                "host": env.host, "port": env.port, "database": db, "user": "node_user",
                "ssl": False, "expect": {**expect, "tls": False},
            }  # fmt: skip
            seen = await trio.to_thread.run_sync(_node_session, spec)
            assert seen["tls"] is False and seen["insert"] == "42501"
            await env.assert_clean()
            assert env.tls_record_layers() == {}
