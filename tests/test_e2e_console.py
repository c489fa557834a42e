"""The console database end to end (PostgreSQL 15 and 18): psql, psycopg, pgjdbc and pg8000 read
SHOW SESSIONS; KILL ends a session with 57P01 naming who ended it; LOCK LOGIN refuses new
connections (28000, the reason in the message) and ends live ones; UNLOCK lets them in;
``console: read`` may only SHOW (42501); no capability: refused (28000); bad input: 42601 with
the position.

psql, psycopg and pgjdbc cannot bind a source address: they come from 127.0.0.1, the console
caller. The sessions they watch come from 127.0.0.2 / 127.0.0.3 over pg8000.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import trio
from console_support import (
    CONSOLE_DB,
    admin_rule,
    console_run,
    jdbc,
    psycopg_dsn,
    psycopg_error,
    psycopg_rows,
    sessions_of,
)
from e2e_support import (
    E2EEnv,
    RawSession,
    capture_logs,
    create_app_database,
    e2e_env,
    make_cert_files,
)
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster

ADMIN = "admin@example.com"
VICTIM_IP = "127.0.0.2"
VICTIM = "victim@example.com"


def _fields(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        return {str(k): str(v) for k, v in exc.args[0].items()}
    return {}


async def _open(env: E2EEnv, db: str, source: str = VICTIM_IP) -> RawSession:
    raw = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source=source))
    assert (await trio.to_thread.run_sync(raw.read_result_of, "select v from t")) == "ok:one"
    return raw


async def _ended(raw: RawSession, *, bound: float = 10.0) -> dict[str, str]:
    """The FATAL the idle session ``raw`` gets when it is ended (waits at most ``bound``)."""
    fields = await trio.to_thread.run_sync(lambda: raw.read_until_closed(timeout=bound))
    raw.close()
    assert fields.get("S") == "FATAL", fields
    return fields


async def _refused(env: E2EEnv, db: str, source: str) -> dict[str, str]:
    try:
        conn = await env.pg8000_connect(db, source=source)
    except DatabaseError as exc:
        return _fields(exc)
    conn.close()
    raise AssertionError("the connection was not refused")


def _setup(env: E2EEnv, db: str, *, level: str = "admin") -> None:
    env.grant("127.0.0.1", rules=[admin_rule(level)], login=ADMIN, node="ops-laptop")
    env.grant(VICTIM_IP, {db: {"permissions": ["readonly"]}}, login=VICTIM, node="victim-box")


async def test_clients_read_sessions_and_kill_ends_one(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    with trio.fail_after(240):
        async with e2e_env(pg, tmp_path) as env:
            _setup(env, db)
            victim = await _open(env, db)

            # psql (simple protocol)
            r = await env.psql("SHOW SESSIONS", CONSOLE_DB)
            assert r.returncode == 0, r.stderr
            [line] = [x for x in r.stdout.splitlines() if VICTIM in x]
            cells = line.split("|")
            assert cells[3:7] == [VICTIM, "victim-box", db, cells[6]]
            assert cells[6].startswith("wp_pg_main_victim_example_com")
            assert cells[7].startswith(VICTIM_IP + ":")
            assert cells[8] == "off"

            # psycopg (extended protocol)
            cols, rows = await psycopg_rows(env.host, env.port, "SHOW SESSIONS")
            assert cols[:3] == ["conn_id", "instance", "listener"]
            [row] = [x for x in rows if x[3] == VICTIM]
            conn_id = row[0]
            assert int(row[11]) > 0 and int(row[12]) > 0  # bytes in / out
            assert row[10] == "idle"  # state, from pg_stat_activity

            # state: idle in transaction, then active (polled, bounded).
            other = await _open(env, db)
            assert (await trio.to_thread.run_sync(other.read_result_of, "BEGIN")) == ""
            with trio.fail_after(15):
                while "idle in transaction" not in [
                    r[10] for r in (await psycopg_rows(env.host, env.port, "SHOW SESSIONS"))[1]
                ]:
                    await trio.sleep(0.1)
            other.send_query("SELECT pg_catalog.pg_sleep(30)")
            with trio.fail_after(15):
                while "active" not in [
                    r[10] for r in (await psycopg_rows(env.host, env.port, "SHOW SESSIONS"))[1]
                ]:
                    await trio.sleep(0.1)
            other.close()
            cols, instances = await psycopg_rows(env.host, env.port, "show instances;")
            assert cols == ["instance", "started", "sessions", "last_seen"] and len(instances) == 1

            # pgjdbc (extended protocol, its startup queries)
            out = await jdbc(env.host, env.port, "SHOW SESSIONS", "SHOW LOCKS")
            assert out[0].split("\t")[1:4] == ["conn_id", "instance", "listener"]
            assert any(line.startswith(f"ROW\t{conn_id}\t") for line in out), out
            assert out[-1].split("\t") == ["COLUMNS", "login", "node", "reason", "locked_by", "locked_at", "expires", "node_ids"]

            with capture_logs() as logs:
                _, killed = await psycopg_rows(env.host, env.port, f"KILL '{conn_id}'")
            assert killed == []
            fields = await _ended(victim)
            assert fields["C"] == "57P01"
            assert ADMIN in fields["M"] and "ops-laptop" in fields["M"]
            # Its backend ended too (polled, bounded).
            with trio.fail_after(15):
                while pg.execute("SELECT 1 FROM pg_stat_activity WHERE pid = :p", p=victim.pid):
                    await trio.sleep(0.05)
            audited = [e for e in logs.events("console_command") if e["statement"].startswith("KILL")]
            assert audited and audited[0]["login"] == ADMIN and audited[0]["tag"] == "KILL 1"
            with trio.fail_after(10):
                while await sessions_of(env.running, VICTIM):
                    await trio.sleep(0.05)

            # KILL LOGIN: every session of that login (here, two).
            a = await _open(env, db)
            b = await _open(env, db)
            out = await jdbc(env.host, env.port, f"KILL LOGIN '{VICTIM}' NODE 'victim-box'")
            assert out == ["OK 2"], out  # pgjdbc reads the tag "KILL 2"
            for conn in (a, b):
                fields = await _ended(conn)
                assert fields["C"] == "57P01" and ADMIN in fields["M"]
            await env.assert_clean()


async def test_lock_refuses_and_ends_then_unlock(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    with trio.fail_after(240):
        async with e2e_env(pg, tmp_path) as env:
            _setup(env, db)
            live = await _open(env, db)
            r = await env.psql(f"LOCK LOGIN '{VICTIM}' FOR '1h' REASON 'incident 4711: laptop stolen'", CONSOLE_DB)
            assert r.returncode == 0, r.stderr
            fields = await _ended(live)
            assert fields["C"] == "57P01" and "incident 4711" in fields["M"] and ADMIN in fields["M"]

            refused = await _refused(env, db, VICTIM_IP)
            assert refused["C"] == "28000"
            assert "incident 4711: laptop stolen" in refused["M"] and ADMIN in refused["M"]

            cols, locks = await psycopg_rows(env.host, env.port, "SHOW LOCKS")
            [lock] = locks
            lock_row = dict(zip(cols, lock, strict=True))
            assert lock_row["login"] == VICTIM and lock_row["node"] is None
            assert lock_row["reason"] == "incident 4711: laptop stolen"
            assert ADMIN in lock_row["locked_by"] and lock_row["expires"] is not None

            # A lock on another node of the login leaves this node alone.
            await console_run(env.running, f"UNLOCK LOGIN '{VICTIM}'")
            await console_run(env.running, f"LOCK LOGIN '{VICTIM}' NODE 'other-box' REASON 'x'")
            again = await env.pg8000_connect(db, source=VICTIM_IP)
            assert again.run("select 1") == [[1]]
            again.close()
            await console_run(env.running, f"UNLOCK LOGIN '{VICTIM}' NODE 'other-box'")
            assert await console_run(env.running, "SHOW LOCKS") == []
            await env.assert_clean()


async def test_a_lock_set_in_another_case_locks_the_login(pg: PgCluster, tmp_path: Path) -> None:
    """Attack: the admin types the login as the directory shows it (``Victim@Example.COM``),
    the caller is ``victim@example.com``: the lock must end and refuse the caller all the same,
    stay one lock when set again in another case, and be removed by UNLOCK in any case."""
    db = create_app_database(pg)
    with trio.fail_after(240):
        async with e2e_env(pg, tmp_path) as env:
            _setup(env, db)
            live = await _open(env, db)
            await console_run(env.running, "LOCK LOGIN 'Victim@Example.COM' NODE 'VICTIM-BOX' REASON 'case'")
            fields = await _ended(live)
            assert fields["C"] == "57P01" and "locked: case" in fields["M"]
            refused = await _refused(env, db, VICTIM_IP)
            assert refused["C"] == "28000" and "case" in refused["M"]

            await console_run(env.running, f"LOCK LOGIN '{VICTIM}' NODE 'victim-box' REASON 'again'")
            [lock] = await console_run(env.running, "SHOW LOCKS")
            assert lock[2] == "again"
            assert "again" in (await _refused(env, db, VICTIM_IP))["M"]
            assert await console_run(env.running, "UNLOCK LOGIN 'VICTIM@example.com' NODE 'Victim-Box'") == []
            assert await console_run(env.running, "SHOW LOCKS") == []
            (await _open(env, db)).close()
            await env.assert_clean()


async def test_a_node_lock_follows_the_device_renamed(pg: PgCluster, tmp_path: Path) -> None:
    """Attack: the owner of a locked device renames it (same Tailscale node, same stable id,
    another name) and connects again: still refused. Another device of the login is not
    locked; ``NODE ID`` locks a device by its stable id whatever its name."""
    db = create_app_database(pg)
    other_ip = "127.0.0.3"
    with trio.fail_after(240):
        async with e2e_env(pg, tmp_path) as env:
            _setup(env, db)
            env.grant(other_ip, {db: {"permissions": ["readonly"]}}, login=VICTIM, node="victim-phone")
            live = await _open(env, db)
            [listed] = await sessions_of(env.running, VICTIM)
            assert listed["node"] == "victim-box"
            await console_run(env.running, f"LOCK LOGIN '{VICTIM}' NODE 'victim-box' REASON 'stolen box'")
            assert (await _ended(live))["C"] == "57P01"

            # The same node under a new name (tailscaled keeps its stable id): refused.
            env.grant(VICTIM_IP, {db: {"permissions": ["readonly"]}}, login=VICTIM, node="innocent-box")
            refused = await _refused(env, db, VICTIM_IP)
            assert refused["C"] == "28000" and "stolen box" in refused["M"]
            [lock] = await console_run(env.running, "SHOW LOCKS")
            stable_id = lock[-1]
            assert stable_id == listed["node_id"] and stable_id.startswith("n"), lock
            # Another device of the same login: not locked.
            phone = await _open(env, db, source=other_ip)
            [phone_row] = await sessions_of(env.running, VICTIM)
            assert phone_row["node"] == "victim-phone"
            await console_run(env.running, f"UNLOCK LOGIN '{VICTIM}' NODE 'victim-box'")
            (await _open(env, db)).close()

            # By stable id (SHOW SESSIONS lists it): the phone, whatever it is called.
            phone_id = phone_row["node_id"]
            assert phone_id and phone_id != stable_id
            await console_run(env.running, f"LOCK LOGIN '{VICTIM}' NODE ID '{phone_id}' REASON 'by id'")
            assert (await _ended(phone))["C"] == "57P01"
            env.grant(other_ip, {db: {"permissions": ["readonly"]}}, login=VICTIM, node="new-phone")
            assert "by id" in (await _refused(env, db, other_ip))["M"]
            (await _open(env, db)).close()  # the renamed box is not this node
            await console_run(env.running, f"UNLOCK LOGIN '{VICTIM}' NODE ID '{phone_id}'")
            (await _open(env, db, source=other_ip)).close()
            await env.assert_clean()


async def test_read_only_console_and_refusals(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    with trio.fail_after(240):
        async with e2e_env(pg, tmp_path) as env:
            _setup(env, db, level="read")
            live = await env.pg8000_connect(db, source=VICTIM_IP)
            assert await sessions_of(env.running, VICTIM)
            for sql in (f"KILL LOGIN '{VICTIM}'", f"LOCK LOGIN '{VICTIM}' REASON 'no'", "KILL 'x'"):
                err = await psycopg_error(env.host, env.port, sql)
                assert err.sqlstate == "42501", (sql, err)
            out = await jdbc(env.host, env.port, f"UNLOCK LOGIN '{VICTIM}'", "SHOW INSTANCES")
            assert out[0].startswith("ERROR 42501 "), out
            assert out[1].startswith("COLUMNS\tinstance"), out
            assert live.run("select 1") == [[1]]  # untouched
            live.close()

            # The victim has a database grant but no console capability: refused.
            refused = await _refused(env, CONSOLE_DB, VICTIM_IP)
            assert refused["C"] == "28000" and "console" in refused["M"]
            # An unknown peer: refused too.
            refused = await _refused(env, CONSOLE_DB, "127.0.0.9")
            assert refused["C"] == "28000"

            # A console session whose grant is withdrawn: its next statement ends it (28000).
            console = await trio.to_thread.run_sync(
                lambda: psycopg.connect(psycopg_dsn(env.host, env.port), autocommit=True)
            )
            with console:
                assert await trio.to_thread.run_sync(lambda: console.execute("SHOW LOCKS").fetchall()) == []
                env.grant("127.0.0.1", rules=[], login=ADMIN, node="ops-laptop")
                with pytest.raises(psycopg.OperationalError) as info:
                    await trio.to_thread.run_sync(console.execute, "SHOW LOCKS")
                assert info.value.sqlstate == "28000"


BAD_INPUT = [
    ("SHOW SESSION", 6),
    ("KILL LOGIN bob", 12),
    ("LOCK LOGIN 'a' FOR 'soon' REASON 'x'", 20),
    ("LOCK LOGIN 'a'", 15),
    ("SELECT * FROM pg_stat_activity", 1),
    ("KILL 'unterminated", 6),
    ("SHOW LOCKS; SHOW LOCKS", 13),
]


async def test_bad_console_input_gets_42601_with_position(pg15: PgCluster, tmp_path: Path) -> None:
    """psycopg reads the position; psql points at it; pgjdbc gets the SQLSTATE. The listener
    and the console connection go on serving."""
    async with e2e_env(pg15, tmp_path) as env:
        env.grant("127.0.0.1", rules=[admin_rule()], login=ADMIN, node="ops-laptop")
        for sql, position in BAD_INPUT:
            with capture_logs() as logs:
                err = await psycopg_error(env.host, env.port, sql)
            assert err.sqlstate == "42601", sql
            assert err.diag.statement_position == str(position), (sql, str(err))
            # Refused input is audited too.
            first = logs.events("console_command")[0]
            assert (first["statement"], first["sqlstate"], first["login"]) == (sql, "42601", ADMIN)
            r = await env.psql(sql, CONSOLE_DB)
            assert r.returncode != 0 and "ERROR:" in r.stderr and "LINE 1:" in r.stderr, r.stderr
        # (pgjdbc splits "a; b" into two statements itself: that case is left out.)
        single = [sql for sql, _ in BAD_INPUT if ";" not in sql]
        out = await jdbc(env.host, env.port, *single, "SHOW LOCKS")
        assert [line.split()[:2] for line in out[: len(single)]] == [["ERROR", "42601"]] * len(single)
        assert out[-1].startswith("COLUMNS\tlogin"), out


async def test_console_over_tls_with_a_custom_database_name(pg15: PgCluster, tmp_path: Path) -> None:
    """The console answers through the client's TLS session, under ``console_database``; the
    default name then reaches the backend like any database name (and is refused here)."""
    certs = make_cert_files(tmp_path / "certs")
    extra = certs.listener_extra() + '\nconsole_database = "wpconsole"'
    async with e2e_env(pg15, tmp_path, tls_mode="require", listener_extra=extra) as env:
        env.grant("127.0.0.1", rules=[admin_rule()], login=ADMIN, node="ops-laptop")
        r = await env.psql("SHOW INSTANCES", "wpconsole", sslmode="require", binary="/usr/bin/psql")
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.strip().splitlines()) == 1
        r = await env.psql("SHOW INSTANCES", CONSOLE_DB, sslmode="require", binary="/usr/bin/psql")
        assert r.returncode != 0 and "not authorized" in r.stderr, r.stderr
        r = await env.psql("SHOW INSTANCES", "wpconsole", sslmode="disable", binary="/usr/bin/psql")
        assert r.returncode != 0 and "TLS" in r.stderr
