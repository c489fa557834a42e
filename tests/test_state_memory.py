"""Memory backend timers under trio's MockClock (no real I/O here)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from state_support import cancel_target as target

from waypoint.config.model import StateConfig
from waypoint.state import MemoryStateStore, SlotLease, SlotRequest, open_state


async def test_cancel_key_expires_exactly_at_its_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStateStore()
    await store.register_cancel_key(1, b"abcd", target("db", 5432), ttl=3600)
    await trio.sleep(3599)
    assert await store.lookup_cancel_key(1, b"abcd") == target("db", 5432)
    await trio.sleep(2)
    assert await store.lookup_cancel_key(1, b"abcd") is None


async def test_reregistering_a_cancel_key_replaces_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStateStore()
    await store.register_cancel_key(1, b"abcd", target("old", 1), ttl=10)
    await store.register_cancel_key(1, b"abcd", target("new", 2), ttl=10)
    assert await store.lookup_cancel_key(1, b"abcd") == target("new", 2)
    await store.register_cancel_key(1, b"efgh", target("other", 3), ttl=10)
    await store.unregister_cancel_key(1, b"abcd")
    assert await store.lookup_cancel_key(1, b"abcd") is None
    assert await store.lookup_cancel_key(1, b"efgh") == target("other", 3)


async def test_expired_cancel_keys_are_purged(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStateStore()
    for pid in range(2048):
        await store.register_cancel_key(pid, b"abcd", target("db", 5432), ttl=1)
        await trio.sleep(0.01)
    assert len(store._cancel) < 2048


async def test_lock_waits_until_deadline_then_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStateStore()
    assert await store.acquire_lock("l", ttl=100, deadline=trio.current_time() + 1) is not None
    start = trio.current_time()
    assert await store.acquire_lock("l", ttl=100, deadline=start + 30) is None
    assert 30 <= trio.current_time() - start < 30.5


async def test_lock_expires_by_ttl(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStateStore()
    assert await store.acquire_lock("l", ttl=10, deadline=trio.current_time()) is not None
    start = trio.current_time()
    assert await store.acquire_lock("l", ttl=10, deadline=start + 60) is not None
    assert 10 <= trio.current_time() - start < 10.5


async def test_lock_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        await MemoryStateStore().acquire_lock("l", ttl=0, deadline=0)


def test_slot_request_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="principal"):
        SlotRequest("", "pg-main")
    with pytest.raises(ValueError, match="max_user must be >= 0"):
        SlotRequest("a", "pg-main", max_user=-1)


async def test_open_state_memory_yields_a_working_store() -> None:
    async with open_state(StateConfig()) as store:
        lease = await store.acquire_slot(SlotRequest("a", "l", max_total=1))
        assert isinstance(lease, SlotLease)
        await store.release_slot(lease)


async def test_open_state_redis_without_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"needs \[state\] url"):
        async with open_state(StateConfig(backend="redis")):
            pass
