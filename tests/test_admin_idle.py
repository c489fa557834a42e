"""Idle admin sessions close after ``admin_idle_timeout`` (trio's MockClock drives the time).

An admin session left idle in a database blocks what needs that database to itself: in
``template1`` it makes ``CREATE DATABASE`` fail ("source database is being accessed by other
users"). The pool closes every session idle for ``idle_timeout``; the background task checks
every quarter of it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import pg8000.native
import pytest
import trio
import trio.testing
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.provision.admin import IDLE_TIMEOUT, AdminPools, AdminSession

_names = itertools.count(1)


@pytest.fixture
def manual_clock() -> trio.testing.MockClock:
    """Time stands still until the test jumps it."""
    return trio.testing.MockClock()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def listener_for(host: str = "127.0.0.1", port: int = 5432, **pgopts: Any) -> ListenerConfig:
    return ListenerConfig(
        name="pg-main",
        listen="127.0.0.1:0",
        backend=f"{host}:{port}",
        backend_tls="disable",
        postgres=PostgresListenerConfig(admin_user="a", admin_password="p", **pgopts),
    )


class FakeConn:
    """Stands in for a pg8000 connection: answers every statement, records close()."""

    def __init__(self) -> None:
        self.closed = False

    def run(self, sql: str, **params: Any) -> list[list[Any]]:
        return [[1]]

    def close(self) -> None:
        self.closed = True


class FakePools(AdminPools):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            listener_for(), limiter=trio.CapacityLimiter(2), connect_timeout=5.0, **kwargs
        )
        self.conns: list[FakeConn] = []

    def _connect_blocking(self, database: str) -> AdminSession:
        conn = FakeConn()
        self.conns.append(conn)
        return AdminSession(conn, database)  # type: ignore[arg-type]


def test_the_default_idle_timeout_is_a_minute_and_must_be_positive() -> None:
    assert IDLE_TIMEOUT == 60.0
    assert listener_for().postgres.admin_idle_timeout == IDLE_TIMEOUT
    with pytest.raises(ValueError, match="idle_timeout"):
        FakePools(idle_timeout=0)


async def test_an_idle_session_closes_at_the_idle_timeout_and_not_before(
    manual_clock: trio.testing.MockClock,
) -> None:
    pools = FakePools(idle_timeout=60.0)
    await pools.run("app", lambda s: s.run("SELECT 1"))
    await pools.run("other", lambda s: s.run("SELECT 1"))
    assert pools.idle_count("app") == pools.idle_count("other") == 1

    manual_clock.jump(30)
    await pools.run("other", lambda s: s.run("SELECT 1"))  # used again: idle from now on
    manual_clock.jump(29.5)
    assert await pools.expire_idle() == 0
    assert pools.idle_count("app") == 1

    manual_clock.jump(0.5)  # "app" has been idle for 60 s, "other" for 30 s
    assert await pools.expire_idle() == 1
    assert pools.idle_count("app") == 0 and pools.idle_count("other") == 1
    app_conn, other_conn = pools.conns
    assert app_conn.closed and not other_conn.closed

    manual_clock.jump(30)
    assert await pools.expire_idle() == 1
    assert other_conn.closed and pools.idle_count("other") == 0
    # A later statement opens a fresh session.
    await pools.run("app", lambda s: s.run("SELECT 1"))
    assert len(pools.conns) == 3
    await pools.aclose()


async def test_the_background_task_checks_every_quarter_of_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Recording(FakePools):
        def __init__(self) -> None:
            super().__init__(idle_timeout=40.0)
            self.checks: list[float] = []

        async def expire_idle(self) -> int:
            self.checks.append(trio.current_time())
            return 0

    pools = Recording()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pools.expire_idle_forever)
        await trio.sleep(41)
        nursery.cancel_scope.cancel()
    assert [t - start for t in pools.checks] == [10.0, 20.0, 30.0, 40.0]


async def test_the_background_task_closes_a_session_within_a_quarter_past_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pools = FakePools(idle_timeout=40.0)
    await pools.run("template1", lambda s: s.run("SELECT 1"))
    went_idle = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pools.expire_idle_forever)
        with trio.fail_after(40 * 1.25 + 1):
            while pools.idle_count("template1"):
                await trio.sleep(1)
        closed_after = trio.current_time() - went_idle
        nursery.cancel_scope.cancel()
    assert pools.conns[0].closed
    assert 40 <= closed_after <= 50


# -- on PostgreSQL: an idle admin session in template1 stops blocking CREATE DATABASE -----------


@pytest.fixture
def new_db_name(pg: PgCluster) -> Iterator[str]:
    name = f"idle_{os.getpid()}_{next(_names)}"
    yield name
    pg.drop_database(name)


def _admin_sessions_in(pg: PgCluster, database: str) -> int:
    rows = pg.execute(
        "SELECT count(*) FROM pg_catalog.pg_stat_activity "
        "WHERE datname = :d AND usename = :u AND application_name = 'waypoint-admin'",
        d=database,
        u=pg.admin_user,
    )
    return int(rows[0][0])


async def test_an_idle_admin_session_in_template1_closes_so_create_database_works(
    pg: PgCluster, new_db_name: str, manual_clock: trio.testing.MockClock
) -> None:
    lst = ListenerConfig(
        name="pg-main",
        listen="127.0.0.1:0",
        backend=f"{pg.host}:{pg.port}",
        backend_tls="disable",
        postgres=PostgresListenerConfig(
            admin_user=pg.admin_user, admin_password=pg.admin_password
        ),
    )
    pools = AdminPools(
        lst, limiter=trio.CapacityLimiter(2), connect_timeout=10.0, idle_timeout=60.0
    )
    try:
        await pools.run("template1", lambda s: s.run("SELECT 1"))
        assert _admin_sessions_in(pg, "template1") == 1
        create = f"CREATE DATABASE {pg8000.native.identifier(new_db_name)} TEMPLATE template1"
        with pytest.raises(DatabaseError) as excinfo:
            await trio.to_thread.run_sync(pg.execute, create)
        assert excinfo.value.args[0]["C"] == "55006", excinfo.value.args[0]

        manual_clock.jump(60)
        assert await pools.expire_idle() == 1
        # The server ends the backend just after the client closes: poll it (the MockClock
        # stands still, so the bound is a count of real 50 ms naps).
        for _ in range(100):
            if _admin_sessions_in(pg, "template1") == 0:
                break
            await trio.to_thread.run_sync(time.sleep, 0.05)
        assert _admin_sessions_in(pg, "template1") == 0
        await trio.to_thread.run_sync(pg.execute, create)
    finally:
        await pools.aclose()
