"""Redis-only behaviour: several instances, leases of dead instances, outages, key layout."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
import trio.testing
from log_support import configured_log, parse_lines
from redis.crc import key_slot
from state_support import KeySpace, OwnRedis, free_port, redis_client
from state_support import cancel_target as target

from waypoint.errors import Refusal
from waypoint.state import SlotLease, SlotRequest, StateStore, cancel_key_digest, open_state
from waypoint.state.redis_store import ACQUIRE_LUA, RELEASE_LUA, KeyLayout, RedisStateStore

pytestmark = pytest.mark.redis

# The operation timeout of the tests whose Redis is down (killed, or never started: its port
# refuses connections at once) or emptied: what they check does not depend on how long a
# call may take, and a generous timeout keeps a loaded machine's slow calls, made while Redis
# is up, from turning into refusals.
OUTAGE_OP_TIMEOUT = 5.0
# Where a call must really time out, Redis is stalled (SIGSTOP) or a write is held in flight:
# the timeout then fires whatever the machine's speed. It is still long enough for the calls
# made before the stall on a loaded machine.
STALL_OP_TIMEOUT = 1.0


def req(principal: str = "alice@example.com", **limits: int) -> SlotRequest:
    limits.setdefault("max_total", 1000)
    return SlotRequest(principal, "pg-main", **limits)


def unmaintained_store(
    space: KeySpace, lease: float, op_timeout: float = 2.0, instance_id: str = "dead-instance"
) -> RedisStateStore:
    """An instance whose heartbeat never runs: it behaves like one that died."""
    client = redis.Redis.from_url(space.url, socket_timeout=2, socket_connect_timeout=1)
    return RedisStateStore(
        client, KeyLayout(space.prefix), lease, instance_id, trio.CapacityLimiter(4), op_timeout
    )


def redis_ms(raw: redis.Redis) -> int:
    """Redis's own clock (TIME) in milliseconds: what lease and ttl expiries are judged by."""
    seconds, micros = raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def wait_for_redis_clock_past(raw: redis.Redis, ms: int, bound: float = 60) -> None:
    """Poll Redis's clock until it is past ``ms``; ``bound`` only keeps a stuck test from
    hanging (the wait itself is as long as Redis says)."""
    with trio.fail_after(bound):
        while redis_ms(raw) <= ms:
            await trio.sleep(0.05)


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
    """Two instances die holding slots: one with a lease far longer than the test, whose slot
    must still count at the end, and one with a short lease, whose slots must come back once
    Redis's clock passes the expiry its last write set, not before. Nothing here depends on
    how fast the test runs: the expiry is read from Redis and waited for on Redis's clock."""
    limits = {"max_user": 4, "max_total": 4}
    raw = redis_client(redis_space.url)
    user_key = KeyLayout(redis_space.prefix).user("alice@example.com")
    # The live instance's lease is long too: no heartbeat of it matters here.
    async with open_state(redis_space.config(lease=300.0), instance_id="live") as live:
        assert isinstance(await live.acquire_slot(req(**limits)), SlotLease)
        lasting = unmaintained_store(redis_space, lease=300.0, instance_id="dead-lasting")
        lasting_before = redis_ms(raw)
        assert isinstance(await lasting.acquire_slot(req(**limits)), SlotLease)
        short = unmaintained_store(redis_space, lease=1.0, instance_id="dead-short")
        before = redis_ms(raw)
        for _ in range(2):
            assert isinstance(await short.acquire_slot(req(**limits)), SlotLease)
        after = redis_ms(raw)
        for dead in (lasting, short):
            dead._client.close()  # never releases, never heartbeats
        # Each dead entry stops counting one lease after its last write, on Redis's own clock
        # (a lease written twice as long, or in the wrong unit, fails here).
        expires = int(raw.hget(user_key, "e:dead-short") or 0)
        assert before + 1000 <= expires <= after + 1000
        lasting_expires = int(raw.hget(user_key, "e:dead-lasting") or 0)
        assert lasting_before + 300_000 <= lasting_expires <= before + 300_000

        # Once Redis's clock is past the short lease, the very next acquires get its two
        # slots; the lasting dead instance's slot still counts, so the one after is refused.
        await wait_for_redis_clock_past(raw, expires)
        for _ in range(2):
            assert isinstance(await live.acquire_slot(req(**limits)), SlotLease)
        refused = await live.acquire_slot(req(**limits))
        assert isinstance(refused, Refusal) and refused.sqlstate == "53300", refused
        assert redis_ms(raw) < lasting_expires  # that refusal was within the lasting lease
        usage = await live.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.total) == (4, 4)
        assert raw.hget(user_key, "c:dead-short") is None  # the expired entry is gone
    raw.close()


async def test_live_instance_keeps_its_slots_past_the_lease(redis_space: KeySpace) -> None:
    """Only the heartbeat (every lease / 3) keeps a live instance's slots counted once the
    expiry its acquires wrote has passed. The lease is long enough that a heartbeat starved
    by a loaded machine for a second or two still lands in time; the wait is on Redis's
    clock, past two leases after the acquires."""
    lease = 3.0
    raw = redis_client(redis_space.url)
    user_key = KeyLayout(redis_space.prefix).user("alice@example.com")
    async with open_state(redis_space.config(lease=lease), instance_id="live") as live:
        before = redis_ms(raw)
        for _ in range(2):
            assert isinstance(await live.acquire_slot(req(max_user=2)), SlotLease)
        acquired_expiry = int(raw.hget(user_key, "e:live") or 0)
        assert acquired_expiry >= before + 3000
        await wait_for_redis_clock_past(raw, acquired_expiry + 3000)
        # The entry was pushed forward by heartbeats: it is still in the future.
        assert int(raw.hget(user_key, "e:live") or 0) > redis_ms(raw)
        async with open_state(redis_space.config(lease=lease), instance_id="other") as other:
            usage = await other.slot_usage("alice@example.com", "pg-main")
            assert (usage.user, usage.total) == (2, 2)
            assert isinstance(await other.acquire_slot(req(max_user=2)), Refusal)
        assert redis_space.client().exists(f"{redis_space.prefix}instance:live") == 1
    raw.close()


async def test_closing_an_instance_gives_back_its_slots(redis_space: KeySpace) -> None:
    async with open_state(redis_space.config(), instance_id="a") as a:
        assert isinstance(await a.acquire_slot(req(max_user=1)), SlotLease)
    async with open_state(redis_space.config(), instance_id="b") as b:
        assert isinstance(await b.acquire_slot(req(max_user=1)), SlotLease)
    assert redis_space.client().exists(f"{redis_space.prefix}instance:a") == 0


class GatedRedis(redis.Redis):
    """A client whose SET of ``instance_key`` (the heartbeat) waits at ``gate`` once it has
    begun, and whose DELETE of that key (the close) opens the gate when done: the latest
    moment a heartbeat still in flight could land."""

    instance_key = ""
    gate: threading.Event
    set_begun: threading.Event
    set_done: threading.Event

    def set(self, name: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        if name != self.instance_key:
            return super().set(name, value, *args, **kwargs)
        self.set_begun.set()
        self.gate.wait(timeout=60)  # bounded: the test fails below if it ran out
        try:
            return super().set(name, value, *args, **kwargs)
        finally:
            self.set_done.set()

    def delete(self, *names: Any) -> Any:
        try:
            return super().delete(*names)
        finally:
            if self.instance_key in names:
                self.gate.set()


def gated_client(url: str, instance_key: str) -> GatedRedis:
    client = GatedRedis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    client.instance_key = instance_key
    client.gate, client.set_begun, client.set_done = (threading.Event() for _ in range(3))
    return client


async def wait_for_thread_event(event: threading.Event, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not event.is_set():
            await trio.sleep(0.01)


@pytest.mark.parametrize("maintenance_stopped_first", [True, False], ids=["stopped", "running"])
async def test_a_heartbeat_in_flight_never_revives_a_closed_instance(
    redis_space: KeySpace, maintenance_stopped_first: bool
) -> None:
    """The heartbeat's SET of the instance key is in flight when the instance closes (its
    maintenance stopped first, as open_state does, or still running). Whatever the order,
    the close's DELETE must be the last write: the instance must not look alive for a lease
    after it closed, nor hold its slot again."""
    layout = KeyLayout(redis_space.prefix)
    client = gated_client(redis_space.url, layout.instance("closing"))
    limiter = trio.CapacityLimiter(4)
    store = RedisStateStore(client, layout, 30.0, "closing", limiter, 5.0)
    assert isinstance(await store.acquire_slot(req(max_user=1)), SlotLease)

    async def open_gate_when_only_the_heartbeat_is_out() -> None:
        # Once every task waits and the heartbeat's SET is the only Redis call out, nothing
        # but that SET can move on: let it land (a close that did not wait has deleted
        # already, and its DELETE opened the gate itself).
        while not client.gate.is_set():
            await trio.testing.wait_all_tasks_blocked()
            if limiter.borrowed_tokens == 1:
                client.gate.set()
            await trio.sleep(0.01)

    maintenance = trio.CancelScope()
    maintenance_ended = trio.Event()

    async def maintain() -> None:
        with maintenance:
            await store.run_maintenance()
        maintenance_ended.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(maintain)
            await wait_for_thread_event(client.set_begun)
            nursery.start_soon(open_gate_when_only_the_heartbeat_is_out)
            if maintenance_stopped_first:  # what open_state does
                maintenance.cancel()
                await maintenance_ended.wait()
            await store.aclose()
            maintenance.cancel()
        await wait_for_thread_event(client.set_done)
        await store._heartbeat()  # one due after the close writes nothing
    assert client.gate.is_set()
    raw = redis_space.client()
    try:
        assert raw.exists(layout.instance("closing")) == 0
        assert raw.hget(layout.user("alice@example.com"), "c:closing") is None
    finally:
        raw.close()
    async with open_state(redis_space.config(), instance_id="other") as other:
        assert isinstance(await other.acquire_slot(req(max_user=1)), SlotLease)


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
        # A short ttl is the key's own in Redis: the other instance finds the key while
        # Redis holds it and not once Redis's clock has passed the expiry. (The ttl leaves
        # a loaded machine room between the write and the first lookup.)
        raw = redis_client(redis_space.url)
        short_key = KeyLayout(redis_space.prefix).cancel(77, secret)
        written = redis_ms(raw)
        await a.register_cancel_key(77, secret, target("10.0.0.6", 5433), ttl=2.0)
        ttl_ms = raw.pttl(short_key)
        assert 0 < ttl_ms <= 2000
        assert await b.lookup_cancel_key(77, secret) == target("10.0.0.6", 5433)
        await wait_for_redis_clock_past(raw, written + 2000)
        assert raw.exists(short_key) == 0
        assert await b.lookup_cancel_key(77, secret) is None
        raw.close()


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
        # Deadlines that must be met are generous (a loaded machine); the ones that must run
        # out are short, and the lock is held for 30 s meanwhile.
        token = await a.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 30)
        assert token is not None
        assert await b.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 0.3) is None
        await b.release_lock(token.__class__(token.name, "forged-token"))
        assert await b.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 0.2) is None
        await a.release_lock(token)
        again = await b.acquire_lock("role:wp_x", ttl=30, deadline=trio.current_time() + 30)
        assert again is not None


async def test_lock_expires_by_its_ttl_across_instances(redis_space: KeySpace) -> None:
    raw = redis_client(redis_space.url)
    key = KeyLayout(redis_space.prefix).lock("l")
    async with (
        open_state(redis_space.config(), instance_id="a") as a,
        open_state(redis_space.config(), instance_id="b") as b,
    ):
        taken = redis_ms(raw)
        held = await a.acquire_lock("l", ttl=2.0, deadline=trio.current_time() + 30)
        assert held is not None
        assert 0 < raw.pttl(key) <= 2000  # the ttl is on the key itself
        # Held: a short try by the other instance gets nothing (the 2 s ttl leaves a loaded
        # machine room for that try), and the key still holds the first token after it.
        assert await b.acquire_lock("l", ttl=30, deadline=trio.current_time() + 0.3) is None
        assert raw.get(key) == held.token.encode()
        # Never released: only the ttl frees it, and then the other instance's wait ends,
        # on Redis's clock no earlier than the ttl after the first acquire.
        token = await b.acquire_lock("l", ttl=30, deadline=trio.current_time() + 60)
        assert token is not None
        assert redis_ms(raw) >= taken + 2000
        assert raw.get(key) == token.token.encode()


class LosingRedis(redis.Redis):
    """A client whose next write (a script, or a SET), once ``lose`` is set, runs on the
    server but loses its answer: a call that timed out after Redis ran it. ``before_raise``
    runs in between (in the worker thread)."""

    lose = False
    before_raise: Callable[[], object] = staticmethod(lambda: None)

    def _answer(self, result: Any) -> Any:
        if self.lose:
            self.lose = False
            self.before_raise()
            raise redis.TimeoutError("the answer was lost")
        return result

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self._answer(super().evalsha(sha, numkeys, *keys_and_args))

    def set(self, name: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        return self._answer(super().set(name, value, *args, **kwargs))


def losing_store(space: KeySpace) -> tuple[RedisStateStore, LosingRedis]:
    client = LosingRedis.from_url(space.url, socket_timeout=5, socket_connect_timeout=2)
    store = RedisStateStore(
        client, KeyLayout(space.prefix), 30.0, "losing", trio.CapacityLimiter(4), 5.0
    )
    return store, client


async def test_a_lock_taken_by_a_try_whose_answer_was_lost_is_the_next_trys(
    redis_space: KeySpace,
) -> None:
    """The first try takes the lock but its answer is lost: the next try finds the lock its
    own token's instead of waiting out the ttl (longer than the deadline: it would fail)."""
    store, client = losing_store(redis_space)
    raw = redis_space.client()
    key = KeyLayout(redis_space.prefix).lock("l")
    try:
        client.lose = True
        token = await store.acquire_lock("l", ttl=300, deadline=trio.current_time() + 60)
        assert token is not None
        assert raw.get(key) == token.token.encode()
        assert 0 < raw.pttl(key) <= 300_000
        await store.release_lock(token)
        assert raw.exists(key) == 0
    finally:
        client.close()
        raw.close()


async def test_a_lock_try_whose_answer_was_lost_is_given_back_at_the_deadline(
    redis_space: KeySpace, mock_clock: trio.testing.MockClock
) -> None:
    """The only try before the deadline takes the lock but its answer is lost (trio's clock
    is moved past the deadline meanwhile): the caller gets None, and the lock must not stay
    held until its ttl by a token no caller has."""
    store, client = losing_store(redis_space)
    raw = redis_space.client()
    key = KeyLayout(redis_space.prefix).lock("l")
    try:
        client.lose = True
        client.before_raise = lambda: trio.from_thread.run_sync(mock_clock.jump, 100)
        assert await store.acquire_lock("l", ttl=30, deadline=trio.current_time() + 10) is None
        assert raw.exists(key) == 0
    finally:
        client.close()
        raw.close()


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
    # Nothing listens on the port: every call is refused at once, whatever the timeout; the
    # bound below only keeps a regression that hangs from hanging the session.
    async with open_state(redis_space.config(), op_timeout=OUTAGE_OP_TIMEOUT) as store:
        with trio.fail_after(60):
            refused = await store.acquire_slot(req(max_user=10))
            assert isinstance(refused, Refusal)
            assert refused.sqlstate == "08004"
            assert "shared state (Redis)" in refused.message
            assert await store.lookup_cancel_key(1, b"abcd") is None
            assert await store.acquire_lock("l", ttl=1, deadline=trio.current_time() + 0.3) is None


async def test_redis_restart_fails_closed_then_release_lands(own_redis: OwnRedis) -> None:
    """A Redis that is down refuses a connection at once: the acquire fails closed and the
    release does not raise, whatever the operation timeout (a generous one here, so that a
    slow machine cannot turn the calls made while Redis is up into refusals)."""
    config = KeySpace(own_redis.url).config(lease=3.0)
    async with open_state(config, op_timeout=OUTAGE_OP_TIMEOUT) as store:
        first = await store.acquire_slot(req(max_user=5))
        second = await store.acquire_slot(req(max_user=5))
        assert isinstance(first, SlotLease) and isinstance(second, SlotLease)
        own_redis.stop()  # killed and waited for: its port refuses connections
        with trio.fail_after(60):  # only against a hang
            refused = await store.acquire_slot(req(max_user=5))
        assert isinstance(refused, Refusal) and refused.sqlstate == "08004"
        with trio.fail_after(60):
            await store.release_slot(first)  # must not raise
        own_redis.start()  # empty: --save ''

        async def repaired() -> bool:
            usage = await store.slot_usage("alice@example.com", "pg-main")
            return (usage.user, usage.user_listener, usage.total) == (1, 1, 1)

        await wait_for(repaired, timeout=60)
        await store.release_slot(second)
        usage = await store.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.total) == (0, 0)


async def test_release_during_a_stall_is_retried_and_lands(own_redis: OwnRedis) -> None:
    assert own_redis.proc is not None
    # A long lease puts the next heartbeat (lease / 3) far past every wait below: only the
    # background retry of the failed release can make it land.
    config = KeySpace(own_redis.url).config(lease=300.0)
    async with open_state(config, op_timeout=STALL_OP_TIMEOUT) as store:
        leases = [await store.acquire_slot(req(max_user=5)) for _ in range(3)]
        assert all(isinstance(x, SlotLease) for x in leases)
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            start = trio.current_time()
            first = leases[0]
            assert isinstance(first, SlotLease)
            with trio.fail_after(30):  # bounded (2 x the call timeout per key group)
                await store.release_slot(first)
            # Stay stalled a while: the background repair fails several times meanwhile,
            # and its back-off must not grow past a few seconds because of that.
            await trio.sleep_until(start + 5.0)
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)

        async def landed() -> bool:
            usage = await store.slot_usage("alice@example.com", "pg-main")
            return (usage.user, usage.user_listener, usage.total) == (2, 2, 2)

        # Long before the next heartbeat (100 s): the background retry did it (its back-off
        # starts at 50 ms and doubles per failure: a few seconds after a stall this long).
        await wait_for(landed, timeout=30)


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
            store = unmaintained_store(
                KeySpace(server.url), lease=30.0, op_timeout=OUTAGE_OP_TIMEOUT
            )
            assert isinstance(await store.acquire_slot(req(max_user=5)), SlotLease)
            # What a replica promoted before it had the writes holds: none of them.
            redis_client(server.url).flushall()
            with trio.fail_after(60):
                await store.acquire_slot(req(max_user=5))  # the counts are found lost
            server.stop()  # killed: its port refuses connections at once
            with trio.fail_after(60):
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

    def atomically(*writes: Callable[[Any], object]) -> list[Any]:
        """The writes, then this instance's count on the key, in one MULTI/EXEC: no
        re-assertion by the store's heartbeat can come between a write and what it left."""
        pipe = raw.pipeline(transaction=True)
        for write in writes:
            write(pipe)
        pipe.hget(user, "c:fenced")
        return list(pipe.execute())

    # A lease of seconds: a heartbeat starved by a loaded machine must not let the entry
    # expire under the checks below.
    async with open_state(redis_space.config(lease=3.0), instance_id="fenced") as store:
        for _ in range(2):
            assert isinstance(await store.acquire_slot(req(max_user=5)), SlotLease)

        async def reasserted() -> bool:
            return raw.hget(user, "s:fenced") is not None

        await wait_for(reasserted, timeout=60)  # the heartbeat (lease / 3) re-asserted it
        stale_release, stale_acquire, count = atomically(
            lambda c: release(keys=[user], args=["fenced", before], client=c),
            lambda c: acquire(keys=[user], args=["fenced", 600, before, 0], client=c),
        )
        assert (stale_release, stale_acquire, count) == (0, [-1, 0], b"2")
        usage = await store.slot_usage("alice@example.com", "pg-main")
        assert (usage.user, usage.total) == (2, 2)
        # A write carrying a current epoch is applied (what the store itself sends).
        now = time.time_ns() // 1000 + 10**9
        applied, count = atomically(lambda c: release(keys=[user], args=["fenced", now], client=c))
        assert (applied, count) == (1, b"1")
    raw.close()


async def test_a_redis_that_restarted_empty_gets_the_counts_back_before_any_grant(
    own_redis: OwnRedis,
) -> None:
    """A Redis that lost acknowledged writes (restarted empty, or a replica promoted before
    it had them) must not grant against the counts it lost: the first acquire on such a key
    sees this instance's entry missing, re-asserts it and only then counts."""
    config = KeySpace(own_redis.url).config()
    async with open_state(config, op_timeout=OUTAGE_OP_TIMEOUT) as store:
        for _ in range(3):
            assert isinstance(await store.acquire_slot(req(max_user=3, max_total=3)), SlotLease)
        own_redis.stop()
        own_redis.start()  # empty: --save ''
        results: list[SlotLease | Refusal] = []

        async def one() -> None:
            results.append(await store.acquire_slot(req(max_user=3, max_total=3)))

        with trio.fail_after(60):
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
    config = redis_space.config()
    async with open_state(config, instance_id="w", op_timeout=STALL_OP_TIMEOUT) as store:
        assert isinstance(store, RedisStateStore)
        leases = [await store.acquire_slot(req(max_user=5)) for _ in range(2)]
        first = leases[0]
        assert isinstance(first, SlotLease)
        user = KeyLayout(redis_space.prefix).user("alice@example.com")
        held = store._held[user]
        held.dirty = True
        held.in_flight += 1  # a write that does not end within the release's bound
        with trio.fail_after(30):
            await store.release_slot(first)  # bounded: 2 x the call timeout per key group
        held.in_flight -= 1
        store._wake.set()

        async def repaired() -> bool:
            usage = await store.slot_usage("alice@example.com", "pg-main")
            return (usage.user, usage.user_listener, usage.total) == (1, 1, 1)

        await wait_for(repaired, timeout=60)
