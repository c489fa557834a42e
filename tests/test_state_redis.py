"""Redis-only behaviour: several instances, leases of dead instances, outages, key layout."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis
import trio
from log_support import configured_log, parse_lines
from redis.crc import key_slot
from state_support import KeySpace, OwnRedis, free_port, redis_client
from state_support import cancel_target as target

from waypoint.errors import Refusal
from waypoint.state import SlotLease, SlotRequest, StateStore, cancel_key_digest, open_state
from waypoint.state.redis_store import ACQUIRE_LUA, RELEASE_LUA, KeyLayout, RedisStateStore

pytestmark = pytest.mark.redis


def req(principal: str = "alice@example.com", **limits: int) -> SlotRequest:
    limits.setdefault("max_total", 1000)
    return SlotRequest(principal, "pg-main", **limits)


def unmaintained_store(
    space: KeySpace, lease: float, op_timeout: float = 2.0
) -> RedisStateStore:
    """An instance whose heartbeat never runs: it behaves like one that died."""
    client = redis.Redis.from_url(space.url, socket_timeout=2, socket_connect_timeout=1)
    return RedisStateStore(
        client, KeyLayout(space.prefix), lease, "dead-instance", trio.CapacityLimiter(4), op_timeout
    )


async def wait_for(
    predicate_async: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1
) -> float:
    start = trio.current_time()
    with trio.fail_after(timeout):
        while not await predicate_async():
            await trio.sleep(interval)
    return trio.current_time() - start


async def test_two_instances_share_one_user_budget(redis_space: KeySpace) -> None:
    async with (
        open_state(redis_space.config(), instance_id="a") as a,
        open_state(redis_space.config(), instance_id="b") as b,
    ):
        a1 = await a.acquire_slot(req(max_user=3))
        a2 = await a.acquire_slot(req(max_user=3))
        b1 = await b.acquire_slot(req(max_user=3))
        assert all(isinstance(x, SlotLease) for x in (a1, a2, b1))
        refused = await a.acquire_slot(req(max_user=3))
        assert isinstance(refused, Refusal) and refused.sqlstate == "53300"
        assert isinstance(b1, SlotLease)
        await b.release_slot(b1)
        assert isinstance(await a.acquire_slot(req(max_user=3)), SlotLease)
        usage = await b.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.total) == (3, 3)


async def test_200_concurrent_acquires_across_two_instances_grant_exactly_10(
    redis_space: KeySpace,
) -> None:
    results: list[tuple[StateStore, SlotLease | Refusal]] = []
    async with (
        open_state(redis_space.config(), instance_id="a") as a,
        open_state(redis_space.config(), instance_id="b") as b,
    ):

        async def one(store: StateStore) -> None:
            results.append((store, await store.acquire_slot(req(max_user=10))))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, a if i % 2 else b)
        granted = [(store, r) for store, r in results if isinstance(r, SlotLease)]
        assert len(granted) == 10
        assert {store for store, _ in granted} == {a, b}
        for _, r in results:
            if isinstance(r, Refusal):
                assert "max_conns (all listeners) = 10" in r.message
        for store, lease in granted:
            await store.release_slot(lease)
        usage = await a.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.user_listener, usage.total) == (0, 0, 0)


async def test_dead_instance_slots_expire_within_the_lease(redis_space: KeySpace) -> None:
    limits = {"max_user": 4, "max_total": 4}
    async with open_state(redis_space.config(lease=1.0), instance_id="live") as live:
        # The live instance holds a slot too, so its heartbeat keeps the keys themselves alive:
        # only the per-instance lease can free the dead instance's slots.
        assert isinstance(await live.acquire_slot(req(**limits)), SlotLease)
        dead = unmaintained_store(redis_space, lease=1.0)
        for _ in range(3):
            assert isinstance(await dead.acquire_slot(req(**limits)), SlotLease)
        dead._client.close()  # never releases, never heartbeats
        start = time.monotonic()
        assert isinstance(await live.acquire_slot(req(**limits)), Refusal)

        async def granted() -> bool:
            return isinstance(await live.acquire_slot(req(**limits)), SlotLease)

        await wait_for(granted, timeout=5)
        assert time.monotonic() - start < 3.0
        usage = await live.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.total) == (2, 2)


async def test_live_instance_keeps_its_slots_past_the_lease(redis_space: KeySpace) -> None:
    async with open_state(redis_space.config(lease=1.0), instance_id="live") as live:
        for _ in range(2):
            assert isinstance(await live.acquire_slot(req(max_user=2)), SlotLease)
        await trio.sleep(2.5)  # 2.5 leases: only the heartbeat keeps them
        async with open_state(redis_space.config(lease=1.0), instance_id="other") as other:
            usage = await other.slot_usage("alice@example.com", "pg-main")
            assert (usage.user, usage.total) == (2, 2)
            assert isinstance(await other.acquire_slot(req(max_user=2)), Refusal)
        assert redis_space.client().exists(f"{redis_space.prefix}instance:live") == 1


async def test_closing_an_instance_gives_back_its_slots(redis_space: KeySpace) -> None:
    async with open_state(redis_space.config(), instance_id="a") as a:
        assert isinstance(await a.acquire_slot(req(max_user=1)), SlotLease)
    async with open_state(redis_space.config(), instance_id="b") as b:
        assert isinstance(await b.acquire_slot(req(max_user=1)), SlotLease)
    assert redis_space.client().exists(f"{redis_space.prefix}instance:a") == 0


async def test_cancel_keys_route_across_instances_and_hide_the_secret(
    redis_space: KeySpace,
) -> None:
    secret = os.urandom(32)
    async with (
        open_state(redis_space.config(), instance_id="a") as a,
        open_state(redis_space.config(), instance_id="b") as b,
    ):
        await a.register_cancel_key(1234, secret, target("10.0.0.5", 5432), ttl=60)
        assert await b.lookup_cancel_key(1234, secret) == target("10.0.0.5", 5432)
        assert await b.lookup_cancel_key(1234, os.urandom(32)) is None
        keys = [k.decode() for k in redis_space.keys("cancel:*")]
        assert len(keys) == 1
        assert secret.hex() not in keys[0]
        ttl_ms = redis_space.client().pttl(keys[0])
        assert 0 < ttl_ms <= 60_000
        await a.unregister_cancel_key(1234, secret)
        assert await b.lookup_cancel_key(1234, secret) is None
        await a.register_cancel_key(77, secret, target("10.0.0.6", 5433), ttl=0.4)
        assert await b.lookup_cancel_key(77, secret) == target("10.0.0.6", 5433)
        await trio.sleep(0.8)
        assert await b.lookup_cancel_key(77, secret) is None


async def test_cancel_values_written_by_others_are_read_bounded_and_parsed_strictly(
    redis_space: KeySpace,
) -> None:
    """Whoever can write Redis chooses a cancel key's value: the lookup reads at most a few
    KiB of it and gives a target only for a well-formed one (a bare ``host:port`` names no
    listener and no owner, so no cancel matches it)."""
    client = redis_space.client()
    async with open_state(redis_space.config(), instance_id="b") as b:
        good = target("10.0.0.5", 5432)
        cases: list[tuple[bytes, object]] = [
            (good.encode().encode(), good),
            (b"10.0.0.9:6379", target("10.0.0.9", 6379, listener="", principal="")),
            (b'{"l": "pg-main", "b": "10.0.0.5", "p": "x"}', None),
            (b"\xff\xfe", None),
            (good.encode().encode() + b" " * 5000, None),  # oversized
        ]
        for i, (value, expected) in enumerate(cases):
            secret = os.urandom(8)
            key = f"{redis_space.prefix}cancel:{cancel_key_digest(i + 1, secret)}"
            client.set(key, value, px=60_000)
            assert await b.lookup_cancel_key(i + 1, secret) == expected, value[:60]
    client.close()


async def test_lock_is_exclusive_across_instances(redis_space: KeySpace) -> None:
    async with (
        open_state(redis_space.config(), instance_id="a") as a,
        open_state(redis_space.config(), instance_id="b") as b,
    ):
        token = await a.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 1)
        assert token is not None
        assert await b.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 0.3) is None
        await b.release_lock(token.__class__(token.name, "forged-token"))
        assert await b.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 0.2) is None
        await a.release_lock(token)
        assert (
            await b.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 1) is not None
        )


async def test_lock_expires_by_its_ttl_across_instances(redis_space: KeySpace) -> None:
    async with (
        open_state(redis_space.config(), instance_id="a") as a,
        open_state(redis_space.config(), instance_id="b") as b,
    ):
        assert await a.acquire_lock("l", ttl=0.5, deadline=trio.current_time() + 1) is not None
        start = trio.current_time()
        token = await b.acquire_lock("l", ttl=30, deadline=trio.current_time() + 5)
        assert token is not None
        assert trio.current_time() - start >= 0.2


def test_one_users_keys_share_a_cluster_slot_and_total_is_apart() -> None:
    layout = KeyLayout("waypoint:")
    for principal in ("alice@example.com", "tagged-devices:web1", "a}b{c", "{x}"):
        user = layout.user(principal)
        listener = layout.user_listener(principal, "pg-main")
        assert key_slot(user.encode()) == key_slot(listener.encode())
        assert user.count("{") == 1 and user.count("}") == 1
    assert "{" not in layout.total()
    assert layout.user("alice@example.com") == "waypoint:slots:{alice@example.com}:user"
    assert (
        layout.user_listener("tagged-devices:web1", "pg-main")
        == "waypoint:slots:{tagged-devices:web1}:listener:pg-main"
    )


async def test_unreachable_redis_fails_closed() -> None:
    redis_space = KeySpace(f"redis://127.0.0.1:{free_port()}/0")
    async with open_state(redis_space.config(), op_timeout=0.5) as store:
        with trio.fail_after(5):
            refused = await store.acquire_slot(req(max_user=10))
            assert isinstance(refused, Refusal)
            assert refused.sqlstate == "08004"
            assert "shared state (Redis)" in refused.message
            assert await store.lookup_cancel_key(1, b"abcd") is None
            assert await store.acquire_lock("l", ttl=1, deadline=trio.current_time() + 0.3) is None


async def test_redis_restart_fails_closed_then_release_lands(own_redis: OwnRedis) -> None:
    async with open_state(KeySpace(own_redis.url).config(lease=3.0), op_timeout=0.5) as store:
        first = await store.acquire_slot(req(max_user=5))
        second = await store.acquire_slot(req(max_user=5))
        assert isinstance(first, SlotLease) and isinstance(second, SlotLease)
        own_redis.stop()
        with trio.fail_after(5):
            refused = await store.acquire_slot(req(max_user=5))
        assert isinstance(refused, Refusal) and refused.sqlstate == "08004"
        with trio.fail_after(5):
            await store.release_slot(first)  # must not raise
        own_redis.start()  # empty: --save ''

        async def repaired() -> bool:
            usage = await store.slot_usage("alice@example.com", "pg-main")
            return (usage.user, usage.user_listener, usage.total) == (1, 1, 1)

        await wait_for(repaired, timeout=10)
        await store.release_slot(second)
        usage = await store.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.total) == (0, 0)


async def test_release_during_a_stall_is_retried_and_lands(own_redis: OwnRedis) -> None:
    assert own_redis.proc is not None
    async with open_state(KeySpace(own_redis.url).config(), op_timeout=0.5) as store:
        leases = [await store.acquire_slot(req(max_user=5)) for _ in range(3)]
        assert all(isinstance(x, SlotLease) for x in leases)
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            start = trio.current_time()
            first = leases[0]
            assert isinstance(first, SlotLease)
            await store.release_slot(first)
            assert trio.current_time() - start < 3.0  # bounded, never hangs the session
            # Stay stalled a while: the background repair fails several times meanwhile,
            # and its back-off must not grow past a few seconds because of that.
            await trio.sleep_until(start + 4.0)
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)

        async def landed() -> bool:
            usage = await store.slot_usage("alice@example.com", "pg-main")
            return (usage.user, usage.user_listener, usage.total) == (2, 2, 2)

        # Well before the next heartbeat (lease/3 = 10 s): the background retry did it
        # (its back-off is capped at 2 s).
        await wait_for(landed, timeout=6)


async def test_a_redis_failover_and_outage_are_events_whose_fields_are_json_keys(
    tmp_path: Path,
) -> None:
    """Lost counts (a failover to a replica that missed writes) and an outage are events with
    named fields, and the Redis password (in the URL) is in none of them."""
    password = "redis-" + secrets.token_hex(8)
    server = OwnRedis(tmp_path, password=password)
    server.start()
    try:
        with configured_log("json") as buffer:
            # No heartbeat: its repair could re-assert the lost counts before the acquire
            # below finds them lost.
            store = unmaintained_store(KeySpace(server.url), lease=30.0, op_timeout=0.5)
            assert isinstance(await store.acquire_slot(req(max_user=5)), SlotLease)
            # What a replica promoted before it had the writes holds: none of them.
            redis_client(server.url).flushall()
            with trio.fail_after(10):
                await store.acquire_slot(req(max_user=5))  # the counts are found lost
            server.stop()
            with trio.fail_after(5):
                refused = await store.acquire_slot(req(max_user=5))
            assert isinstance(refused, Refusal)
            store._client.close()
    finally:
        server.stop()
    records = parse_lines(buffer)
    unavailable = [r for r in records if r["event"] == "state_unavailable"]
    assert unavailable, records
    for r in unavailable:
        assert r["level"] == "warning" and isinstance(r["operation"], str), r
        assert isinstance(r["error"], str) and "message" not in r, r
    assert "acquire" in {r["operation"] for r in unavailable}
    lost = [r for r in records if r["event"] == "state_counts_lost"]
    assert lost and {r["operation"] for r in lost} == {"acquire"}, records
    assert password not in buffer.getvalue()


async def test_writes_sent_before_a_reassertion_are_fenced(redis_space: KeySpace) -> None:
    """A stalled Redis may execute a write whose answer timed out after the repair that
    re-asserted the count: it must not count twice (the CI flake this replaced: a late release
    undercounted the total until the next heartbeat)."""
    before = time.time_ns() // 1000  # older than any epoch of the store opened below
    raw = redis_space.client()
    release = raw.register_script(RELEASE_LUA)
    acquire = raw.register_script(ACQUIRE_LUA)
    layout = KeyLayout(redis_space.prefix)
    user = layout.user("alice@example.com")
    async with open_state(redis_space.config(lease=0.6), instance_id="fenced") as store:
        for _ in range(2):
            assert isinstance(await store.acquire_slot(req(max_user=5)), SlotLease)

        async def reasserted() -> bool:
            return raw.hget(user, "s:fenced") is not None

        await wait_for(reasserted, timeout=5)  # the heartbeat (lease / 3) re-asserted it
        assert release(keys=[user], args=["fenced", before]) == 0
        assert acquire(keys=[user], args=["fenced", 600, before, 0]) == [-1, 0]
        usage = await store.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.total) == (2, 2)
        # A write carrying a current epoch is applied (what the store itself sends).
        now = time.time_ns() // 1000 + 10**9
        assert release(keys=[user], args=["fenced", now]) == 1
        usage = await store.slot_usage("alice@example.com", "pg-main")
        assert usage.user == 1
    raw.close()


async def test_a_redis_that_restarted_empty_gets_the_counts_back_before_any_grant(
    own_redis: OwnRedis,
) -> None:
    """A Redis that lost acknowledged writes (restarted empty, or a replica promoted before
    it had them) must not grant against the counts it lost: the first acquire on such a key
    sees this instance's entry missing, re-asserts it and only then counts."""
    async with open_state(KeySpace(own_redis.url).config(), op_timeout=0.5) as store:
        for _ in range(3):
            assert isinstance(await store.acquire_slot(req(max_user=3, max_total=3)), SlotLease)
        own_redis.stop()
        own_redis.start()  # empty: --save ''
        results: list[SlotLease | Refusal] = []

        async def one() -> None:
            results.append(await store.acquire_slot(req(max_user=3, max_total=3)))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one)
        assert not [r for r in results if isinstance(r, SlotLease)], "granted past the limit"
        assert all(r.sqlstate in ("53300", "08004") for r in results if isinstance(r, Refusal))
        assert sum(r.sqlstate == "53300" for r in results if isinstance(r, Refusal)) >= 5
        usage = await store.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.user_listener, usage.total) == (3, 3, 3)


async def test_a_release_cut_off_by_its_bound_still_gives_the_slot_back(
    redis_space: KeySpace,
) -> None:
    """A release waits for the writes in flight on a key marked for repair. If its bound runs
    out meanwhile, the slot must still be gone from this instance's count (else every later
    re-assertion would write one session too many, for ever)."""
    async with open_state(redis_space.config(), instance_id="w", op_timeout=0.2) as store:
        assert isinstance(store, RedisStateStore)
        leases = [await store.acquire_slot(req(max_user=5)) for _ in range(2)]
        first = leases[0]
        assert isinstance(first, SlotLease)
        user = KeyLayout(redis_space.prefix).user("alice@example.com")
        held = store._held[user]
        held.dirty = True
        held.in_flight += 1  # a write that does not end within the release's bound
        with trio.fail_after(5):
            await store.release_slot(first)  # bounded: 2 x the call timeout per key group
        held.in_flight -= 1
        store._wake.set()

        async def repaired() -> bool:
            usage = await store.slot_usage("alice@example.com", "pg-main")
            return (usage.user, usage.user_listener, usage.total) == (1, 1, 1)

        await wait_for(repaired, timeout=5)
