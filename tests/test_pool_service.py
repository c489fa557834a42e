"""The app's pool (``BackendPool``) on trio's MockClock: what it gives up is ended in the
background, expired backends on time, a role's before its ``VALID UNTIL``, everything at
shutdown, and nothing is kept once it is closed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from waypoint.observability.metrics import Metrics
from waypoint.pool import BackendPool, Pooled, PoolKey, PoolLimits

LIMITS = PoolLimits(idle_timeout=60, max_lifetime=3600, max_per_role=2, max_idle=10)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def key(role: str = "wp_alice", listener: str = "pg") -> PoolKey:
    return PoolKey.of(
        role=role,
        listener=listener,
        server=("10.0.0.1", 5432),
        database="app",
        protocol=(3, 0),
        startup_parameters={},
    )


class Ended:
    def __init__(self) -> None:
        self.names: list[tuple[str, float]] = []

    def item(self, name: str, pid: int, valid_until: float = float("inf")) -> Pooled:
        async def end() -> None:
            await trio.sleep(0.5)  # ending takes a while; the pool does not wait for it
            self.names.append((name, trio.current_time()))

        return Pooled(name, pid, end, valid_until)


async def test_expired_backends_are_ended_on_time(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    pool = BackendPool(metrics)
    ended = Ended()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        t0 = trio.current_time()
        assert pool.keep(key(), ended.item("a", 101), born=t0, limits=LIMITS)
        assert pool.keep(
            key("wp_bob"), ended.item("b", 102, valid_until=t0 + 30), born=t0, limits=LIMITS
        )
        assert pool.pids("pg") == {101, 102}
        await trio.sleep(200)
        # bob's role stopped being valid at +30: ended then; alice's idle timeout at +60.
        assert [(n, round(t - t0, 1)) for n, t in ended.names] == [("b", 30.5), ("a", 60.5)]
        assert pool.pids("pg") == set()
        nursery.cancel_scope.cancel()
    text = metrics.render().decode()
    assert 'waypoint_pool_closes_total{listener="pg",reason="role_closed"} 1.0' in text
    assert 'waypoint_pool_closes_total{listener="pg",reason="idle_timeout"} 1.0' in text
    assert 'waypoint_pool_idle{listener="pg"} 0.0' in text


async def test_taking_and_bounds(autojump_clock: trio.testing.MockClock) -> None:
    pool = BackendPool(Metrics())
    ended = Ended()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        now = trio.current_time()
        for i in range(3):
            assert pool.keep(key(), ended.item(f"a{i}", 100 + i), born=now, limits=LIMITS)
            await trio.sleep(1)
        await trio.sleep(1)
        assert [n for n, _ in ended.names] == ["a0"]  # max_per_role = 2
        taken = pool.take(key())
        assert taken is not None and taken.backend == "a2"
        assert pool.take(key("wp_bob")) is None
        # Past its lifetime already: not kept (the caller ends it).
        assert not pool.keep(key(), ended.item("old", 9), born=now - 4000, limits=LIMITS)
        nursery.cancel_scope.cancel()


async def test_close_all_ends_everything_and_keeps_nothing_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = BackendPool(Metrics())
    ended = Ended()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        now = trio.current_time()
        pool.keep(key(), ended.item("a", 1), born=now, limits=LIMITS)
        pool.keep(key("wp_bob", listener="other"), ended.item("b", 2), born=now, limits=LIMITS)
        assert pool.close_role(("10.0.0.1", 5432), "wp_bob", "role_closed") == 1
        await pool.close_all()
        assert sorted(n for n, _ in ended.names) == ["a", "b"]  # waited for, both
        assert not pool.keep(key(), ended.item("late", 3), born=now, limits=LIMITS)
        assert len(pool.book) == 0
        nursery.cancel_scope.cancel()


async def test_a_pool_not_running_keeps_nothing() -> None:
    pool = BackendPool(Metrics())
    assert not pool.keep(key(), Ended().item("a", 1), born=trio.current_time(), limits=LIMITS)
