"""End to end: many concurrent sessions through one Waypoint never see each other's bytes.

Half the clients speak TLS (relayed by the engine from the client's TLS session), half are
plain (the C hot path); some read their results slowly (the relay toward them backs up);
some COPY FROM STDIN into a table another session holds locked, so their backend stops
reading while they keep sending (the relay toward the backend backs up). Each session
checks that every row it reads is exactly the one it asked for, and that what its backend
stored is exactly what it sent; no row of any session carries another session's marker.

The default suite runs each PostgreSQL version for 10 seconds;
``-m slow`` for 5 minutes (``WAYPOINT_ISOLATION_SECONDS`` overrides either).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

import psycopg
import pytest
import trio
from e2e_support import E2EEnv, create_app_database, e2e_env, make_cert_files
from pgcluster import PgCluster

pytestmark = pytest.mark.pg

SESSIONS = 12
READ_ROWS = 1500
COPY_ROWS = 1500


def _payload(marker: str, seq: int) -> str:
    """A row's text: the session's marker, then enough of its own digest to span packets."""
    return f"{marker}:{seq}:" + hashlib.sha256(f"{marker}/{seq}".encode()).hexdigest() * 8


def _session(env: E2EEnv, db: str, i: int, seconds: float, copy_first: bool) -> tuple[str, int, int]:
    """One client: rounds of a streamed SELECT and a COPY until ``seconds`` pass; returns
    (marker, rows read, rows copied)."""
    tls = i % 2 == 0
    slow = i % 3 == 0
    copier = copy_first or i % 4 == 1
    marker = f"s{i:02d}{secrets.token_hex(4)}"
    sent = read = 0
    dsn = env.dsn(db, sslmode="require" if tls else "disable", application_name=f"iso-{marker}")
    with psycopg.connect(dsn, connect_timeout=30) as conn:
        conn.autocommit = True
        assert bool(conn.info.pgconn.ssl_in_use) == tls
        end = time.monotonic() + seconds
        first = True
        while first or time.monotonic() < end:
            if copier:
                with conn.cursor().copy("COPY sink (sess, seq, payload) FROM STDIN") as copy:
                    for _ in range(COPY_ROWS):
                        copy.write_row((marker, sent, _payload(marker, sent)))
                        sent += 1
            first = False
            cur = conn.cursor()
            expected = 0
            for n, (row,) in enumerate(
                cur.stream(
                    "SELECT %s || ':' || g || ':' || repeat(encode(sha256(convert_to(%s || '/' || g, "
                    "'UTF8')), 'hex'), 8) FROM generate_series(%s::int, %s::int) AS g",
                    (marker, marker, read, read + READ_ROWS - 1),
                )
            ):
                want = _payload(marker, read + expected)
                if row != want:
                    at = next((k for k, (x, y) in enumerate(zip(row, want, strict=False)) if x != y), None)
                    at = min(len(row), len(want)) if at is None else at
                    raise AssertionError(
                        f"session {marker} read a row that is not its own, from offset {at}: "
                        f"{row[at : at + 40]!r} (of {len(row)} chars) instead of {want[at : at + 40]!r}"
                    )
                expected += 1
                if slow and n % 100 == 0:
                    time.sleep(0.002)  # a slow reader: the relay toward it backs up
            assert expected == READ_ROWS
            read += READ_ROWS
        # Streamed and compared row by row: a long run stores gigabytes, which a fetchall
        # (and a list of the expected rows beside it) would hold in this process at once.
        count = 0
        for seq, payload in conn.cursor().stream(
            "SELECT seq, payload FROM sink WHERE sess = %s ORDER BY seq", (marker,)
        ):
            assert (seq, payload) == (count, _payload(marker, count)), (
                f"session {marker}: stored row {count} is {seq}, {payload[:60]!r}"
            )
            count += 1
    assert count == sent, f"session {marker}: its backend stored {count} rows, not the {sent} it sent"
    return marker, read, sent


async def _wait_for_lock_waiters(pg: PgCluster, db: str, count: int) -> None:
    """Until ``count`` sessions wait for the sink's lock (bounded)."""
    with trio.fail_after(60):
        while True:
            rows = await trio.to_thread.run_sync(
                lambda: pg.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = :db "
                    "AND application_name LIKE 'iso-%' AND wait_event_type = 'Lock'",
                    db=db,
                )
            )
            if rows[0][0] >= count:
                return
            await trio.sleep(0.05)


async def _isolation_run(pg: PgCluster, tmp_path: Path, seconds: float) -> None:
    db = create_app_database(pg)
    pg.execute(
        f"SET ROLE {pg.admin_user}; CREATE TABLE public.sink (sess text, seq int, payload text);"
        # each session reads its own rows back at the end: without an index, a long run
        # makes that a scan of every session's rows, once per session
        " CREATE INDEX ON public.sink (sess, seq)",
        dbname=db,
    )
    certs = make_cert_files(tmp_path / "certs")
    async with e2e_env(pg, tmp_path, tls_mode="optional", listener_extra=certs.listener_extra()) as env:
        env.grant("127.0.0.1", {db: {"permissions": ["readwrite"]}})
        # Another session holds the sink locked: the first COPYs wait, their backends do
        # not read what their clients keep sending.
        locker = await trio.to_thread.run_sync(
            lambda: psycopg.connect(pg.dsn(dbname=db), connect_timeout=30)
        )
        results: list[tuple[str, int, int]] = []
        copy_first = {1, 2, 3}
        try:
            await trio.to_thread.run_sync(
                lambda: locker.execute("LOCK TABLE sink IN SHARE MODE")
            )
            limiter = trio.CapacityLimiter(SESSIONS)
            # The read-back at the end grows with the run (a long run stores gigabytes, and
            # reads them back through the relay): the bound grows with it.
            with trio.fail_after(seconds * 2 + 120):
                async with trio.open_nursery() as nursery:

                    async def one(i: int) -> None:
                        # Abandoned on timeout: a session stuck on foreign bytes fails the
                        # test at the bound instead of hanging it.
                        results.append(
                            await trio.to_thread.run_sync(
                                _session,
                                env,
                                db,
                                i,
                                seconds,
                                i in copy_first,
                                limiter=limiter,
                                abandon_on_cancel=True,
                            )
                        )

                    for i in range(SESSIONS):
                        nursery.start_soon(one, i)
                    await _wait_for_lock_waiters(pg, db, len(copy_first))
                    await trio.sleep(0.5)  # the waiting COPYs' clients keep sending meanwhile
                    await trio.to_thread.run_sync(locker.rollback)
        finally:
            await trio.to_thread.run_sync(locker.close)
        assert len(results) == SESSIONS
        # Nothing stored carries another session's marker, and every session's rows are there.
        rows = await trio.to_thread.run_sync(
            lambda: pg.execute(
                "SELECT sess, count(*), count(*) FILTER (WHERE payload NOT LIKE sess || ':%') "
                "FROM sink GROUP BY sess",
                dbname=db,
            )
        )
        stored = {sess: (n, foreign) for sess, n, foreign in rows}
        assert all(foreign == 0 for _, foreign in stored.values()), stored
        assert stored == {m: (sent, 0) for m, _, sent in results if sent}, stored
        await env.assert_clean()
        # Every TLS session (the even ones) had its record layer in C.
        assert env.tls_record_layers() == {"c": len(range(0, SESSIONS, 2))}


async def test_concurrent_sessions_read_and_store_only_their_own_bytes(
    pg: PgCluster, tmp_path: Path
) -> None:
    seconds = float(os.environ.get("WAYPOINT_ISOLATION_SECONDS", "10"))
    await _isolation_run(pg, tmp_path, seconds)


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_concurrent_sessions_keep_to_their_own_bytes_for_five_minutes(
    pg: PgCluster, tmp_path: Path
) -> None:
    seconds = float(os.environ.get("WAYPOINT_ISOLATION_SECONDS", "300"))
    await _isolation_run(pg, tmp_path, seconds)
