"""Highly available Redis: a Sentinel failover under load, and Redis Cluster specifics.

The Sentinel test kills the master (SIGKILL) during a burst of slot acquires, releases and
cancel-key writes from two instances, and checks what docs/scaling.md promises: while no
master answers nothing is granted (fail closed); after the Sentinels promote the replica,
slots and cancel keys work again at the first call; once the instances have re-asserted
their counts nothing is double-counted or leaked."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trustme
from attrs import define, evolve, field
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis_ha_support import (
    PASSWORD,
    SENTINEL_PASSWORD,
    SERVICE,
    RedisClusterServers,
    SentinelServers,
    client,
    command,
    free_port,
)
from state_support import cancel_target

from waypoint.config.model import StateConfig
from waypoint.errors import Refusal
from waypoint.state import (
    SlotLease,
    SlotRequest,
    StateStore,
    StateUnavailableError,
    open_state,
)
from waypoint.state.console import InstanceRecord, KillRequest, LockRecord, RedisDirectory
from waypoint.state.redis_store import ACQUIRE_LUA, KeyLayout, RedisStateStore

LEASE = 3.0  # short, so a lost release frees within the test; production uses 30 s
# A master that was killed, a Sentinel that refuses the password, a seed that does not listen
# and a certificate that does not verify all fail a call at once, whatever the timeout: a
# generous one keeps a loaded machine's slow calls to a live master from turning into
# refusals the tests would take for a failover's.
OP_TIMEOUT = 5.0
PRINCIPALS = [f"user{i}@example.com" for i in range(4)]
WORKERS_PER_PRINCIPAL = 8
LISTENER = "pg-main"
# Once the Sentinels name the new master, the first call reaches it: this bound is only room
# for a loaded machine (docs/scaling.md, "What a failover looks like").
RECOVERY_BOUND = 60.0
# How long a burst may take to make the acquires a step needs: only room for a loaded machine
# (the steps wait for a number of acquires, never for a time).
BURST_BOUND = 60.0
FAILOVER_BOUND = 30.0  # Sentinel's own: down-after (1 s) + election + promotion


@pytest.fixture
def sentinel_servers() -> Iterator[SentinelServers]:
    """A topology of this test's own: the test kills its master."""
    with SentinelServers() as servers:
        servers.start()
        yield servers


@pytest.fixture(scope="module")
def cluster_servers() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        servers.start()
        yield servers


def sentinel_cfg(servers: SentinelServers, prefix: str) -> StateConfig:
    return StateConfig(
        backend="redis",
        sentinels=servers.sentinels,
        service_name=SERVICE,
        password=PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
        key_prefix=prefix,
        lease=LEASE,
    )


def cluster_cfg(nodes: tuple[str, ...], prefix: str) -> StateConfig:
    return StateConfig(
        backend="redis", cluster=True, nodes=nodes, password=PASSWORD, key_prefix=prefix
    )


def req(principal: str, limit: int = WORKERS_PER_PRINCIPAL) -> SlotRequest:
    return SlotRequest(principal, LISTENER, max_user=limit, max_total=1000)


@define
class Outcome:
    """One acquire during the burst: when it started and ended (monotonic), what it got."""

    started: float
    ended: float
    granted: bool
    sqlstate: str | None


@define
class Burst:
    outcomes: list[Outcome] = field(factory=list)
    cancel_found: int = 0
    cancel_missed: int = 0
    # Cross-instance cancel lookups that missed once the test said they must not.
    cancel_missed_when_required: int = 0
    require_cancel: bool = False
    stop: trio.Event = field(factory=trio.Event)


async def worker(burst: Burst, own: StateStore, other: StateStore, principal: str) -> None:
    while not burst.stop.is_set():
        started = time.monotonic()
        result = await own.acquire_slot(req(principal))
        ended = time.monotonic()
        if isinstance(result, Refusal):
            burst.outcomes.append(Outcome(started, ended, False, result.sqlstate))
            await trio.sleep(0.02)
            continue
        burst.outcomes.append(Outcome(started, ended, True, None))
        pid, secret = secrets.randbelow(2**31), os.urandom(16)
        target = cancel_target("10.0.1.10", 5432, LISTENER, principal)
        required = burst.require_cancel
        try:
            await own.register_cancel_key(pid, secret, target, ttl=60)
            # Psql's Ctrl-C may reach the other instance: it must find the key in Redis.
            if await other.lookup_cancel_key(pid, secret) == target:
                burst.cancel_found += 1
            else:
                burst.cancel_missed += 1
                if required and burst.require_cancel:
                    burst.cancel_missed_when_required += 1
            await trio.sleep(0.01)
            await own.unregister_cancel_key(pid, secret)
        finally:
            await own.release_slot(result)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def usage_everywhere(stores: list[StateStore]) -> set[tuple[int, int, int]]:
    seen: set[tuple[int, int, int]] = set()
    for store in stores:
        for principal in PRINCIPALS:
            u = await store.slot_usage(principal, LISTENER)
            seen.add((u.user, u.user_listener, u.total))
    return seen


async def wait_until_async(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll an async predicate with a bound; Redis errors count as "not yet"."""
    with trio.move_on_after(timeout):
        while True:
            try:
                if await check():
                    return
            except StateUnavailableError:
                pass
            await trio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


async def wait_for_outcomes(
    what: str, burst: Burst, counted: Callable[[Outcome], bool], more_than: int
) -> None:
    """Let the burst run until more than ``more_than`` of its acquires that ``counted``
    selects have ended: the number of acquires is what a step needs, however long a loaded
    machine takes to make them."""

    async def enough() -> bool:
        return sum(map(counted, burst.outcomes)) > more_than

    await wait_until_async(what, enough, BURST_BOUND)


async def burst_through_a_failover(
    servers: SentinelServers, a: StateStore, b: StateStore, old_master: int, replica: int
) -> None:
    """Kill ``old_master`` during a burst from instances ``a`` and ``b``; check every promise
    of docs/scaling.md ("What a failover looks like") up to ``replica`` serving as master."""
    assert await trio.to_thread.run_sync(servers.master_address) == ("127.0.0.1", old_master)
    burst = Burst()
    stores = [a, b]
    async with trio.open_nursery() as nursery:
        for i in range(len(PRINCIPALS) * WORKERS_PER_PRINCIPAL):
            own, other = (a, b) if i % 2 else (b, a)
            nursery.start_soon(worker, burst, own, other, PRINCIPALS[i % len(PRINCIPALS)])

        # 1. Healthy: every acquire is granted (each principal has exactly as many
        # workers as its limit, so a single count too many would refuse one).
        await wait_for_outcomes("50 acquires before the kill", burst, lambda o: True, 50)
        before = list(burst.outcomes)
        assert all(o.granted for o in before), [o for o in before if not o.granted][:3]
        assert burst.cancel_missed == 0

        # 2. Kill the master mid-burst. Until the Sentinels promote the replica no master
        # answers: nothing may be granted then. The replica's role, polled below, says
        # until when that certainly held.
        servers.kill(old_master)  # returns once the process is gone
        killed_at = time.monotonic()
        probe = await a.acquire_slot(req("probe@example.com", limit=1))
        assert isinstance(probe, Refusal), probe
        assert probe.sqlstate == "08004", probe
        assert "shared state (Redis) is unavailable" in probe.message
        assert isinstance(a, RedisStateStore)
        with pytest.raises(StateUnavailableError):
            await a.ping()
        last_seen_replica = killed_at
        with trio.fail_after(FAILOVER_BOUND):
            while True:
                now = time.monotonic()
                role = await trio.to_thread.run_sync(servers.role, replica)
                if role != "slave":
                    break
                last_seen_replica = now
                await trio.sleep(0.05)
            while await trio.to_thread.run_sync(servers.master_address) != (
                "127.0.0.1",
                replica,
            ):
                await trio.sleep(0.05)
        # The window with no master is real (Sentinel waits down-after, 1 s) when the burst
        # made acquires inside it.
        blind = [o for o in burst.outcomes if o.started > killed_at and o.ended < last_seen_replica]
        assert blind, "the burst made no acquire while no master answered"
        assert not any(o.granted for o in blind), "granted while no master answered"
        assert all(o.sqlstate == "08004" for o in blind), {o.sqlstate for o in blind}

        # 3. The Sentinels name the new master: slots and cancel keys work again at the
        # first call, on both instances.

        async def both_work() -> bool:
            for store, peer in ((a, b), (b, a)):
                lease = await store.acquire_slot(req("check@example.com", limit=2))
                if not isinstance(lease, SlotLease):
                    return False
                await store.release_slot(lease)
                secret = os.urandom(8)
                target = cancel_target("10.0.1.10", 5432)
                await store.register_cancel_key(1, secret, target, ttl=30)
                found = await peer.lookup_cancel_key(1, secret)
                await store.unregister_cancel_key(1, secret)
                if found != target:
                    return False
            return True

        await wait_until_async("slots and cancel keys after failover", both_work, RECOVERY_BOUND)
        recovered, recovered_at = len(burst.outcomes), time.monotonic()
        burst.require_cancel = True
        settled = killed_at + LEASE + 0.5
        # (A loaded machine may recover later than that: the acquires counted start after
        # both, so that they are among those checked below.)
        await wait_for_outcomes(
            "20 acquires a lease after the kill, after recovery",
            burst,
            lambda o: o.started > max(settled, recovered_at),
            20,
        )
        burst.stop.set()
    after = burst.outcomes[recovered:]
    assert sum(o.granted for o in after) > 20, len(after)
    # Every cancel key written after recovery was found by the other instance.
    assert burst.cancel_missed_when_required == 0
    # Nothing is "unavailable" any more. A count the old master acknowledged but never
    # passed on may still refuse (53300) until the instances re-assert their counts, or,
    # on a key the instance no longer holds, until its lease runs out; never later.
    assert all(o.granted or o.sqlstate == "53300" for o in after), [
        o for o in after if not o.granted and o.sqlstate != "53300"
    ][:3]
    late = [o for o in after if o.started > settled]
    assert len(late) > 20, len(late)
    assert all(o.granted for o in late), [o for o in late if not o.granted][:3]

    # 4. Every worker released what it held. Within a lease (a release the old master
    # took but never passed on frees by its lease; a lost acquire is overwritten by the
    # next re-assertion) every count is back to zero, seen from both instances.
    async def all_zero() -> bool:
        return await usage_everywhere(stores) == {(0, 0, 0)}

    # (The bound is a lease plus room for a loaded machine.)
    await wait_until_async("counts back to zero", all_zero, LEASE + 60.0)

    # 5. Nothing double-counted or leaked: every principal gets exactly its limit again,
    # from both instances together, and no more.
    leases: list[tuple[StateStore, SlotLease]] = []
    for principal in PRINCIPALS:
        for i in range(WORKERS_PER_PRINCIPAL):
            store = stores[i % 2]
            got = await store.acquire_slot(req(principal))
            assert isinstance(got, SlotLease), (principal, i, got)
            leases.append((store, got))
        over = await a.acquire_slot(req(principal))
        assert isinstance(over, Refusal) and over.sqlstate == "53300", over
    for store, lease in leases:
        await store.release_slot(lease)
    assert await usage_everywhere(stores) == {(0, 0, 0)}


async def test_sentinel_failover_during_a_burst_fails_closed_and_loses_nothing(
    sentinel_servers: SentinelServers,
) -> None:
    servers = sentinel_servers
    old_master, replica = servers.master_port, servers.replica_port
    cfg = sentinel_cfg(servers, f"wpha:{secrets.token_hex(4)}:")
    # Sentinels that refuse the password name no master: fail closed, at once.
    wrong = evolve(cfg, sentinel_password="not-the-password")
    async with open_state(wrong, op_timeout=OP_TIMEOUT) as store:
        with trio.fail_after(10):
            refused = await store.acquire_slot(req("alice@example.com"))
            assert isinstance(refused, Refusal) and refused.sqlstate == "08004", refused
            assert await store.lookup_cancel_key(1, b"abcd") is None
            assert isinstance(store, RedisStateStore)
            with pytest.raises(StateUnavailableError):
                await store.ping()  # the readiness check says so too
    async with (
        open_state(cfg, instance_id="a", op_timeout=OP_TIMEOUT) as a,
        open_state(cfg, instance_id="b", op_timeout=OP_TIMEOUT) as b,
    ):
        await burst_through_a_failover(servers, a, b, old_master, replica)
    assert_nothing_counted(replica, cfg.key_prefix)


@pytest.mark.slow
async def test_sentinel_fails_over_and_back_during_bursts(
    sentinel_servers: SentinelServers,
) -> None:
    """The long version: the old master comes back (Sentinel makes it a replica of the new
    one), then the new master is killed in turn, each time during a burst."""
    servers = sentinel_servers
    first, second = servers.master_port, servers.replica_port
    cfg = sentinel_cfg(servers, f"wpha:{secrets.token_hex(4)}:")
    async with (
        open_state(cfg, instance_id="a", op_timeout=OP_TIMEOUT) as a,
        open_state(cfg, instance_id="b", op_timeout=OP_TIMEOUT) as b,
    ):
        await burst_through_a_failover(servers, a, b, first, second)
        await trio.to_thread.run_sync(servers.rejoin, first)
        await burst_through_a_failover(servers, a, b, second, first)
    assert_nothing_counted(first, cfg.key_prefix)


def assert_nothing_counted(port: int, prefix: str) -> None:
    """No slot key on the master at ``port`` counts a session (both instances closed)."""
    master = client(port)
    counted = [
        key
        for key in master.scan_iter(match=f"{prefix}slots:*")
        if any(_text(f).startswith("c:") for f in master.hkeys(key))
    ]
    assert counted == []


# --------------------------------------------------------------------------- Redis Cluster


async def test_cluster_spreads_principals_over_the_masters_and_keeps_one_principal_together(
    cluster_servers: RedisClusterServers,
) -> None:
    prefix = f"wpha:{secrets.token_hex(4)}:"
    layout = KeyLayout(prefix)
    principals = [f"user{i}@example.com" for i in range(24)]
    async with open_state(cluster_cfg(cluster_servers.nodes[:1], prefix)) as store:
        leases = []
        for principal in principals:
            lease = await store.acquire_slot(SlotRequest(principal, "pg-a", max_user=1))
            assert isinstance(lease, SlotLease), lease
            leases.append(lease)
        homes = set()
        for principal in principals:
            user = cluster_servers.node_of(layout.user(principal))
            assert user == cluster_servers.node_of(layout.user_listener(principal, "pg-a"))
            assert client(user).exists(layout.user(principal)) == 1
            homes.add(user)
        assert len(homes) == 3  # really spread over the cluster
        assert isinstance(store, RedisStateStore)
        await store.ping()  # the readiness check
        usage = await store.slot_usage(principals[0], "pg-a")
        assert (usage.user, usage.user_listener, usage.total) == (1, 1, 24)
        for lease in leases:
            await store.release_slot(lease)
        usage = await store.slot_usage(principals[0], "pg-a")
        assert (usage.user, usage.total) == (0, 0)


def test_cluster_refuses_a_script_whose_keys_span_two_slots(
    cluster_servers: RedisClusterServers,
) -> None:
    """Why the store takes a slot in two scripts: the user's keys and the deployment total
    live in different slots, and a cluster node refuses a script that names both."""
    layout = KeyLayout("wpha:crossslot:")
    user, total = layout.user("alice@example.com"), layout.total()
    assert key_slot(user.encode()) != key_slot(total.encode())
    raw = client(cluster_servers.node_of(user))
    with pytest.raises(ResponseError, match="don't hash to the same slot"):
        command(raw, "EVAL", ACQUIRE_LUA, "2", user, total, "i", "1000", "1", "0", "0")
    # The same script on the user's two keys (one hash tag, one slot) runs.
    listener = layout.user_listener("alice@example.com", "pg-main")
    assert command(raw, "EVAL", ACQUIRE_LUA, "2", user, listener, "i", "1000", "1", "0", "0") == [
        0,
        0,
    ]


async def test_cluster_serves_the_console_records(cluster_servers: RedisClusterServers) -> None:
    """The console's keys share one hash tag: its MGET of every instance's list, its
    pipelines and its kill-request transaction run on a cluster (they name several keys)."""
    prefix = f"wpha:{secrets.token_hex(4)}:"
    now = time.time()
    async with open_state(cluster_cfg(cluster_servers.nodes[:1], prefix)) as store:
        assert isinstance(store, RedisStateStore)
        d = RedisDirectory(store, time.time)
        for instance in ("a", "b", "c", "d"):
            await d.publish(InstanceRecord(instance, now, now), ttl=5)
        assert sorted(r.instance for r in await d.instances()) == ["a", "b", "c", "d"]
        await d.withdraw("b")
        assert sorted(r.instance for r in await d.instances()) == ["a", "c", "d"]
        await d.request_kill("c", KillRequest("c-1", "admin", "why"))
        assert await d.take_kills("c") == [KillRequest("c-1", "admin", "why")]
        assert await d.take_kills("c") == []
        await d.set_lock(LockRecord("bob", None, "r1", "admin", now, now + 60))
        await d.set_lock(LockRecord("eve", "box", "r2", "admin", now))
        assert await d.lock_for("bob", "any") is not None
        assert await d.lock_for("eve", "other") is None
        assert sorted(lock.login for lock in await d.locks()) == ["bob", "eve"]
        assert await d.remove_lock("eve", "box")


async def test_cluster_unreachable_fails_closed_and_a_later_seed_is_used(
    cluster_servers: RedisClusterServers,
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    prefix = f"wpha:{secrets.token_hex(4)}:"
    async with open_state(cluster_cfg((dead,), prefix), op_timeout=OP_TIMEOUT) as store:
        with trio.fail_after(10):
            refused = await store.acquire_slot(req("alice@example.com"))
            assert isinstance(refused, Refusal) and refused.sqlstate == "08004"
            assert await store.lookup_cancel_key(1, b"abcd") is None
            assert await store.acquire_lock("l", ttl=1, deadline=trio.current_time() + 0.3) is None
            assert isinstance(store, RedisStateStore)
            with pytest.raises(StateUnavailableError):
                await store.ping()
    # A dead seed first, a live one next: the client starts from whichever answers.
    nodes = (dead, cluster_servers.nodes[1])
    async with open_state(cluster_cfg(nodes, prefix), op_timeout=2.0) as store:
        lease = await store.acquire_slot(req("alice@example.com"))
        assert isinstance(lease, SlotLease), lease
        await store.release_slot(lease)


# --------------------------------------------------------------------------- TLS


@pytest.fixture(params=["cluster", "sentinel"])
def tls_servers(request: pytest.FixtureRequest) -> Iterator[RedisClusterServers | SentinelServers]:
    """Servers (and Sentinels) that speak only TLS, with a certificate of a private CA."""
    if request.param == "cluster":
        with RedisClusterServers(tls=True) as cluster:
            cluster.start()
            yield cluster
    else:
        with SentinelServers(tls=True) as sentinel:
            sentinel.start(ready_to_fail_over=False)
            yield sentinel


async def test_tls_to_every_server_is_verified_against_the_configured_ca(
    tls_servers: RedisClusterServers | SentinelServers, tmp_path: Path
) -> None:
    prefix = f"wpha:{secrets.token_hex(4)}:"
    if isinstance(tls_servers, RedisClusterServers):
        base = cluster_cfg(tls_servers.nodes[:1], prefix)
    else:
        base = evolve(sentinel_cfg(tls_servers, prefix), lease=30.0)
    cfg = evolve(base, tls=True, tls_ca_file=str(tls_servers.ca_file))
    async with open_state(cfg, op_timeout=2.0) as store:
        lease = await store.acquire_slot(req("alice@example.com"))
        assert isinstance(lease, SlotLease), lease
        secret = os.urandom(16)
        await store.register_cancel_key(7, secret, cancel_target("10.0.1.10", 5432), ttl=30)
        assert await store.lookup_cancel_key(7, secret) is not None
        token = await store.acquire_lock("l", ttl=5, deadline=trio.current_time() + 2)
        assert token is not None
        await store.release_lock(token)
        await store.release_slot(lease)
        usage = await store.slot_usage("alice@example.com", LISTENER)
        assert (usage.user, usage.total) == (0, 0)
    # A certificate the configured CA did not sign, or no TLS at all: nothing is granted.
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    for wrong in (evolve(cfg, tls_ca_file=str(other_ca)), evolve(base, tls=False)):
        async with open_state(wrong, op_timeout=OP_TIMEOUT) as store:
            with trio.fail_after(10):
                refused = await store.acquire_slot(req("alice@example.com"))
                assert isinstance(refused, Refusal) and refused.sqlstate == "08004", refused
                assert await store.lookup_cancel_key(7, secret) is None
