"""Sessions Waypoint changes or ends while they run (docs/operations.md#when-a-session-ends): revalidation applies a
downgrade live (on PostgreSQL 15 it ends the session: it may have switched to the group it left), closes on revocation or a failing identity lookup; duration and byte limits end
sessions with a FATAL 53400 naming the limit (an idle session too)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pg8000.native
import trio
from e2e_support import RawSession, create_app_database, db_rule, e2e_env
from pgcluster import PgCluster


def _error_fields(exc: BaseException) -> dict[str, Any]:
    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, dict) else {"M": str(exc)}


async def _run(conn: pg8000.native.Connection, sql: str) -> Any:
    return await trio.to_thread.run_sync(conn.run, sql)


async def _run_error(conn: pg8000.native.Connection, sql: str) -> dict[str, Any]:
    try:
        await _run(conn, sql)
    except (pg8000.native.DatabaseError, pg8000.native.InterfaceError) as exc:
        return _error_fields(exc)
    raise AssertionError(f"{sql!r} succeeded")


async def _close(conn: pg8000.native.Connection) -> None:
    # Already closed by Waypoint, possibly.
    with contextlib.suppress(pg8000.native.InterfaceError, OSError):
        await trio.to_thread.run_sync(conn.close)


async def test_revalidation_downgrades_live_and_closes_revoked_and_unidentifiable(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
            env.grant("127.0.0.2", {db: {"permissions": ["readwrite"]}})
            env.grant("127.0.0.3", {db: {"permissions": ["readonly"]}})
            env.grant("127.0.0.4", {db: {"permissions": ["readonly"]}})
            down = await env.pg8000_connect(db, source="127.0.0.2")
            # Raw clients read the FATAL without sending first (a client that writes to a
            # closed socket may get a reset that discards it).
            revoked = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source="127.0.0.3"))
            unknown = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source="127.0.0.4"))
            try:
                await _run(down, "insert into t values (10, 'rw')")

                env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}})
                env.grant("127.0.0.3", rules=[db_rule({db: {"permissions": ["readonly"]}}, listener="other")])
                env.standin.set_fault("status500", ip="127.0.0.4")
                await trio.sleep(3)

                # Downgrade: the same connection, now without INSERT. On 15 the connection
                # ends instead (it may have switched to the group it left with SET ROLE).
                err = await _run_error(down, "insert into t values (11, 'rw')")
                if pg.version < 16:
                    rows = pg.execute("select id from public.t where id >= 10", dbname=db)
                    assert rows == [[10]], (rows, err)
                else:
                    assert err.get("C") == "42501", err
                    assert await _run(down, "select count(*) from t where id = 10") == [[1]]

                # Revocation: FATAL 28000 saying why.
                err = await trio.to_thread.run_sync(lambda: revoked.read_until_closed(timeout=5))
                assert err.get("S") == "FATAL" and err.get("C") == "28000", err
                assert "access revoked" in str(err.get("M")), err

                # Identity lookup failing: closed (fail closed), with the reason.
                err = await trio.to_thread.run_sync(lambda: unknown.read_until_closed(timeout=5))
                assert err.get("S") == "FATAL" and err.get("C") == "28000", err
                assert "identity lookup failed" in str(err.get("M")), err
            finally:
                await _close(down)
                revoked.close()
                unknown.close()
            await env.assert_clean()


async def test_duration_and_byte_limits_end_sessions_with_53400(
    pg15: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg15)
    with trio.fail_after(90):
        async with e2e_env(pg15, tmp_path) as env:
            env.grant(
                "127.0.0.5",
                rules=[db_rule({db: {"permissions": ["readonly"]}}, limits={"max_conn_duration": "2s"})],
            )
            env.grant(
                "127.0.0.6",
                rules=[db_rule({db: {"permissions": ["readonly"]}}, limits={"max_bytes_per_conn": 100000})],
            )
            env.grant(
                "127.0.0.1",
                rules=[db_rule({db: {"permissions": ["readonly"]}}, limits={"max_bytes_per_conn": 100000})],
            )
            # psql mid-query reads the FATAL (pg8000 cannot: it reads on to ReadyForQuery).
            r = await env.psql("select repeat('y', 300000)", db)
            assert r.returncode != 0
            assert "FATAL" in r.stderr and "max_bytes_per_conn" in r.stderr, r.stderr
            idle = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source="127.0.0.5"))
            busy = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source="127.0.0.6"))
            try:
                assert await trio.to_thread.run_sync(lambda: busy.read_result_of("select 1")) == "ok:1"
                busy.send_query("select repeat('x', 200000)")
                err = await trio.to_thread.run_sync(lambda: busy.read_until_closed(timeout=5))
                assert err.get("S") == "FATAL" and err.get("C") == "53400", err
                assert "max_bytes_per_conn" in str(err.get("M")), err

                # The idle session gets its FATAL when the timer fires (it sends nothing, so
                # only the max_conn_duration timer can end it; the wait is only bounded).
                err = await trio.to_thread.run_sync(lambda: idle.read_until_closed(timeout=20))
                assert err.get("S") == "FATAL" and err.get("C") == "53400", err
                assert "max_conn_duration" in str(err.get("M")), err
            finally:
                idle.close()
                busy.close()
            await env.assert_clean()
