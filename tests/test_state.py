"""The same behaviour suite against every state backend: memory, the test session's Redis, a
three-master Redis Cluster and a Sentinel-managed master (both started by this module).

On the cluster every script must keep to one hash slot (the server refuses a script whose keys
span slots, and redis-py refuses to send one), so the suite passing there is the check that
the key layout and the scripts keep to that rule."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio
from redis_ha_support import (
    PASSWORD,
    SENTINEL_PASSWORD,
    SERVICE,
    RedisClusterServers,
    SentinelServers,
)
from state_support import KeySpace, unique_prefix
from state_support import cancel_target as target

from waypoint.config.model import StateConfig
from waypoint.errors import Refusal
from waypoint.state import LockToken, SlotLease, SlotRequest, StateStore, open_state

OpenStore = Callable[..., AbstractAsyncContextManager[StateStore]]


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A three-master Redis Cluster of this module's own (every slot served)."""
    with RedisClusterServers() as servers:
        servers.start()
        yield servers


@pytest.fixture(scope="module")
def redis_sentinel() -> Iterator[SentinelServers]:
    """A master, a replica and three Sentinels of this module's own."""
    with SentinelServers() as servers:
        servers.start(ready_to_fail_over=False)  # nothing here fails over
        yield servers


@pytest.fixture(params=["memory", "redis", "redis-cluster", "redis-sentinel"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(backend: str, request: pytest.FixtureRequest) -> Iterator[OpenStore]:
    prefix = unique_prefix()
    where: dict[str, object] = {}
    if backend == "redis":
        space: KeySpace = request.getfixturevalue("redis_space")
        prefix, where = space.prefix, {"url": space.url}
    elif backend == "redis-cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        where = {"cluster": True, "nodes": cluster.nodes[:1], "password": PASSWORD}
    elif backend == "redis-sentinel":
        sentinel: SentinelServers = request.getfixturevalue("redis_sentinel")
        where = {
            "sentinels": sentinel.sentinels,
            "service_name": SERVICE,
            "password": PASSWORD,
            "sentinel_password": SENTINEL_PASSWORD,
        }

    def factory(lease: float = 30.0) -> AbstractAsyncContextManager[StateStore]:
        cfg = StateConfig(
            backend="memory" if backend == "memory" else "redis",
            key_prefix=prefix,
            lease=lease,
            **where,  # type: ignore[arg-type]
        )
        return open_state(cfg)

    yield factory
    # redis_space deletes its keys; the cluster and the Sentinel-managed servers are this
    # module's own: they go with it.


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[StateStore]:
    async with open_store() as s:
        yield s


def req(
    principal: str = "alice@example.com", listener: str = "pg-main", **limits: int
) -> SlotRequest:
    limits.setdefault("max_total", 1000)
    return SlotRequest(principal, listener, **limits)


def assert_refused(result: SlotLease | Refusal, which: str, value: int) -> None:
    assert isinstance(result, Refusal), result
    assert result.sqlstate == "53300"
    assert f"limit {which} = {value}" in result.message


async def test_200_concurrent_acquires_grant_exactly_the_user_limit(store: StateStore) -> None:
    results: list[SlotLease | Refusal] = []

    async def one() -> None:
        results.append(await store.acquire_slot(req(max_user=10)))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(one)
    leases = [r for r in results if isinstance(r, SlotLease)]
    refusals = [r for r in results if isinstance(r, Refusal)]
    assert len(leases) == 10
    assert len(refusals) == 190
    for r in refusals:
        assert_refused(r, "max_conns (all listeners)", 10)
    usage = await store.slot_usage("alice@example.com", "pg-main")
    assert (usage.user, usage.user_listener, usage.total) == (10, 10, 10)
    for lease in leases:
        await store.release_slot(lease)
    usage = await store.slot_usage("alice@example.com", "pg-main")
    assert (usage.user, usage.user_listener, usage.total) == (0, 0, 0)


async def test_listener_limit_caps_only_that_listener(store: StateStore) -> None:
    a1 = await store.acquire_slot(req(listener="a", max_user_listener=2))
    a2 = await store.acquire_slot(req(listener="a", max_user_listener=2))
    assert isinstance(a1, SlotLease) and isinstance(a2, SlotLease)
    assert_refused(
        await store.acquire_slot(req(listener="a", max_user_listener=2)),
        "max_conns on listener a",
        2,
    )
    b1 = await store.acquire_slot(req(listener="b", max_user_listener=2))
    assert isinstance(b1, SlotLease)
    usage = await store.slot_usage("alice@example.com", "a")
    assert (usage.user, usage.user_listener) == (3, 2)


async def test_user_limit_spans_all_listeners(store: StateStore) -> None:
    for listener in ("a", "a", "b"):
        assert isinstance(await store.acquire_slot(req(listener=listener, max_user=3)), SlotLease)
    assert_refused(
        await store.acquire_slot(req(listener="c", max_user=3)), "max_conns (all listeners)", 3
    )
    # The refusal took nothing on listener c.
    usage = await store.slot_usage("alice@example.com", "c")
    assert (usage.user, usage.user_listener, usage.total) == (3, 0, 3)


async def test_total_limit_caps_the_deployment_and_refusal_leaks_no_user_slot(
    store: StateStore,
) -> None:
    for i in range(5):
        assert isinstance(await store.acquire_slot(req(principal=f"u{i}", max_total=5)), SlotLease)
    assert_refused(await store.acquire_slot(req(principal="u9", max_total=5)), "max_conns_total", 5)
    usage = await store.slot_usage("u9", "pg-main")
    assert (usage.user, usage.user_listener, usage.total) == (0, 0, 5)


async def test_unlimited_scopes_still_count(store: StateStore) -> None:
    leases = [await store.acquire_slot(req(max_total=0)) for _ in range(3)]
    assert all(isinstance(lease, SlotLease) for lease in leases)
    usage = await store.slot_usage("alice@example.com", "pg-main")
    assert (usage.user, usage.user_listener, usage.total) == (3, 3, 3)
    # A later request with a limit sees the sessions taken without one.
    assert_refused(await store.acquire_slot(req(max_user=3)), "max_conns (all listeners)", 3)


async def test_distinct_principals_have_independent_budgets(store: StateStore) -> None:
    web1 = "tagged-devices:web1"
    web2 = "tagged-devices:web2"
    assert isinstance(await store.acquire_slot(req(principal=web1, max_user=1)), SlotLease)
    assert_refused(
        await store.acquire_slot(req(principal=web1, max_user=1)), "max_conns (all listeners)", 1
    )
    assert isinstance(await store.acquire_slot(req(principal=web2, max_user=1)), SlotLease)


async def test_release_is_idempotent(store: StateStore) -> None:
    first = await store.acquire_slot(req(max_user=2))
    second = await store.acquire_slot(req(max_user=2))
    assert isinstance(first, SlotLease) and isinstance(second, SlotLease)
    await store.release_slot(first)
    await store.release_slot(first)
    usage = await store.slot_usage("alice@example.com", "pg-main")
    assert (usage.user, usage.total) == (1, 1)
    assert isinstance(await store.acquire_slot(req(max_user=2)), SlotLease)
    assert_refused(await store.acquire_slot(req(max_user=2)), "max_conns (all listeners)", 2)


async def test_principals_with_key_syntax_stay_apart(store: StateStore) -> None:
    odd = "a}:listener:x{b%"
    assert isinstance(await store.acquire_slot(req(principal=odd, max_user=1)), SlotLease)
    assert isinstance(
        await store.acquire_slot(req(principal="a", listener="x", max_user=1)), SlotLease
    )
    assert_refused(
        await store.acquire_slot(req(principal=odd, max_user=1)), "max_conns (all listeners)", 1
    )


async def test_cancel_key_routes_only_with_the_exact_secret(store: StateStore) -> None:
    secret = bytes(range(32))
    await store.register_cancel_key(4242, secret, target("10.0.1.10", 5432), ttl=60)
    assert await store.lookup_cancel_key(4242, secret) == target("10.0.1.10", 5432)
    assert await store.lookup_cancel_key(4242, secret[:-1] + b"\xff") is None
    assert await store.lookup_cancel_key(4243, secret) is None
    await store.unregister_cancel_key(4242, secret)
    assert await store.lookup_cancel_key(4242, secret) is None


async def test_cancel_key_with_ipv6_backend_and_short_secret(store: StateStore) -> None:
    await store.register_cancel_key(7, b"\x00\x01\x02\x03", target("::1", 6543), ttl=60)
    assert await store.lookup_cancel_key(7, b"\x00\x01\x02\x03") == target("::1", 6543)


async def test_cancel_key_expires_after_its_ttl(store: StateStore) -> None:
    await store.register_cancel_key(99, b"s" * 32, target("127.0.0.1", 5432), ttl=0.3)
    assert await store.lookup_cancel_key(99, b"s" * 32) == target("127.0.0.1", 5432)
    await trio.sleep(0.6)
    assert await store.lookup_cancel_key(99, b"s" * 32) is None


async def test_bad_cancel_key_arguments_are_rejected(store: StateStore) -> None:
    with pytest.raises(ValueError, match=r"4\.\.256 bytes"):
        await store.register_cancel_key(1, b"", target("h", 1), ttl=1)
    with pytest.raises(ValueError, match="32 bits"):
        await store.register_cancel_key(-(2**31) - 1, b"abcd", target("h", 1), ttl=1)
    with pytest.raises(ValueError, match="32 bits"):
        await store.register_cancel_key(2**32, b"abcd", target("h", 1), ttl=1)


async def test_cancel_key_with_the_pid_sign_bit_set_routes(store: StateStore) -> None:
    # The wire core reads BackendKeyData's pid as a signed Int32; a key whose pid has the
    # top bit set (CockroachDB's 64-bit keys) must register and route, not raise.
    await store.register_cancel_key(-5, b"k" * 8, target("127.0.0.1", 26257), ttl=60)
    assert await store.lookup_cancel_key(-5, b"k" * 8) == target("127.0.0.1", 26257)


async def test_lock_excludes_a_second_holder_until_released(store: StateStore) -> None:
    first = await store.acquire_lock("role:wp_alice", ttl=30, deadline=trio.current_time() + 1)
    assert isinstance(first, LockToken)
    assert (
        await store.acquire_lock("role:wp_alice", ttl=30, deadline=trio.current_time() + 0.2)
        is None
    )
    other = await store.acquire_lock("role:wp_bob", ttl=30, deadline=trio.current_time() + 1)
    assert isinstance(other, LockToken)
    await store.release_lock(first)
    again = await store.acquire_lock("role:wp_alice", ttl=30, deadline=trio.current_time() + 1)
    assert isinstance(again, LockToken)


async def test_waiting_lock_acquirer_gets_it_when_released(store: StateStore) -> None:
    held = await store.acquire_lock("l", ttl=30, deadline=trio.current_time() + 1)
    assert held is not None
    got: list[LockToken | None] = []

    async def waiter() -> None:
        got.append(await store.acquire_lock("l", ttl=30, deadline=trio.current_time() + 5))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.2)
        assert got == []
        await store.release_lock(held)
    assert got and got[0] is not None


async def test_stale_lock_token_cannot_release_the_new_holder(store: StateStore) -> None:
    old = await store.acquire_lock("l", ttl=0.3, deadline=trio.current_time() + 1)
    assert old is not None
    new = await store.acquire_lock("l", ttl=30, deadline=trio.current_time() + 3)
    assert new is not None  # taken after the old one expired
    await store.release_lock(old)  # stale: must not free the lock
    assert await store.acquire_lock("l", ttl=30, deadline=trio.current_time() + 0.2) is None
    await store.release_lock(new)
    assert await store.acquire_lock("l", ttl=30, deadline=trio.current_time() + 1) is not None


async def test_lock_gives_mutual_exclusion_to_concurrent_tasks(store: StateStore) -> None:
    inside = 0
    max_inside = 0
    entered = 0

    async def worker() -> None:
        nonlocal inside, max_inside, entered
        token = await store.acquire_lock("crit", ttl=30, deadline=trio.current_time() + 20)
        assert token is not None
        inside += 1
        entered += 1
        max_inside = max(max_inside, inside)
        await trio.sleep(0.01)
        inside -= 1
        await store.release_lock(token)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(worker)
    assert entered == 10
    assert max_inside == 1
