"""The console's shared directory (memory and Redis) and the hub over it, without sockets:
published session lists expire, kill requests reach only their instance, locks carry their
expiry (wall clock, injected) and survive the store that set them; the hub ends local sessions
a lock covers, refuses a locked login, keeps ``console: read`` to SHOW, and logs every command."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from e2e_support import capture_logs
from state_support import KeySpace

from waypoint.console.hub import Caller, ConsoleHub
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.pgwire.responder import Result, StatementError
from waypoint.proxy.registry import LiveSession, SessionRegistry
from waypoint.state import open_state
from waypoint.state.console import (
    ConsoleDirectory,
    InstanceRecord,
    KillRequest,
    LockRecord,
    MemoryDirectory,
    RedisDirectory,
    lock_key,
)
from waypoint.state.redis_store import RedisStateStore


class Wall:
    """A settable wall clock."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def directories(
    space: KeySpace | None, wall: Wall
) -> AsyncIterator[Callable[[], ConsoleDirectory]]:
    """A factory of directories sharing one store (one dict, or one Redis key space)."""
    if space is None:
        shared = MemoryDirectory(wall)
        yield lambda: shared
        return
    async with open_state(space.config(), instance_id="a") as store:
        assert isinstance(store, RedisStateStore)
        yield lambda: RedisDirectory(store, wall)


@pytest.fixture(params=["memory", "redis"])
def space(request: pytest.FixtureRequest) -> KeySpace | None:
    """No key space (the memory directory), or a Redis key space of the test's own."""
    if request.param == "memory":
        return None
    found: KeySpace = request.getfixturevalue("redis_space")
    return found


async def test_lists_expire_and_withdraw(space: KeySpace | None) -> None:
    wall = Wall()
    async with directories(space, wall) as make:
        d = make()
        await d.publish(InstanceRecord("a", wall.now, wall.now), ttl=5)
        await d.publish(InstanceRecord("b", wall.now, wall.now), ttl=5)
        assert sorted(r.instance for r in await d.instances()) == ["a", "b"]
        await d.withdraw("b")
        assert [r.instance for r in await d.instances()] == ["a"]
        wall.now += 6
        assert await d.instances() == []


async def test_kill_requests_reach_their_instance_once(space: KeySpace | None) -> None:
    async with directories(space, Wall()) as make:
        d = make()
        await d.request_kill("b", KillRequest("c-1", "admin", "why"))
        assert await d.take_kills("a") == []
        assert await d.take_kills("b") == [KillRequest("c-1", "admin", "why")]
        assert await d.take_kills("b") == []


async def test_locks_expire_and_match_login_and_node(space: KeySpace | None) -> None:
    wall = Wall()
    async with directories(space, wall) as make:
        d = make()
        await d.set_lock(LockRecord("bob", None, "r1", "admin", wall.now, wall.now + 60))
        await d.set_lock(LockRecord("eve", "box", "r2", "admin", wall.now))
        assert (await d.lock_for("bob", "any")) is not None
        assert (await d.lock_for("eve", "box")) is not None
        assert (await d.lock_for("eve", "other")) is None
        assert len(await d.locks()) == 2
        wall.now += 61
        assert (await d.lock_for("bob", "any")) is None
        assert [lock.login for lock in await d.locks()] == ["eve"]
        assert await d.remove_lock("eve", "box")
        assert not await d.remove_lock("eve", "box")
        assert await d.locks() == []


async def test_locks_match_every_case_of_login_and_node_and_stay_one(space: KeySpace | None) -> None:
    """Logins and node names are case-insensitive at Tailscale: a lock set with one case locks
    every case, setting it again in another case replaces it, and UNLOCK in any case removes it."""
    wall = Wall()
    async with directories(space, wall) as make:
        d = make()
        await d.set_lock(LockRecord("Alice@Example.com", None, "r1", "admin", wall.now))
        await d.set_lock(LockRecord("eve@example.com", "Eve-Box", "r2", "admin", wall.now))
        assert (await d.lock_for("alice@example.com", "laptop")) is not None
        assert (await d.lock_for("ALICE@EXAMPLE.COM", "laptop")) is not None
        assert (await d.lock_for("EVE@example.com", "eve-box")) is not None
        assert (await d.lock_for("eve@example.com", "eve-box2")) is None
        assert (await d.lock_for("alice@example.co", "laptop")) is None
        await d.set_lock(LockRecord("alice@example.com", None, "r3", "admin", wall.now))
        assert sorted((lock.login, lock.reason) for lock in await d.locks()) == [
            ("alice@example.com", "r3"),
            ("eve@example.com", "r2"),
        ]
        assert await d.remove_lock("ALICE@example.com", None)
        assert await d.remove_lock("Eve@Example.com", "EVE-BOX")
        assert await d.locks() == []
        assert await d.lock_for("alice@example.com", "laptop") is None


async def test_a_node_lock_follows_the_stable_ids_it_carries(space: KeySpace | None) -> None:
    """A lock naming a node covers that name, and any node whose stable id it recorded (the
    same device under a new name); a lock by stable id covers that node only."""
    wall = Wall()
    async with directories(space, wall) as make:
        d = make()
        await d.set_lock(LockRecord("eve", "box", "r", "admin", wall.now, None, ("nA", "nB")))
        await d.set_lock(LockRecord("bob", None, "r", "admin", wall.now, None, ("nC",)))
        [eve] = [lock for lock in await d.locks() if lock.login == "eve"]
        assert eve.node_ids == ("nA", "nB")
        assert (await d.lock_for("eve", "box", "nZ")) is not None
        assert (await d.lock_for("eve", "renamed", "nB")) == eve
        assert (await d.lock_for("eve", "renamed", "nZ")) is None
        assert (await d.lock_for("eve", "renamed")) is None  # no stable id known
        assert (await d.lock_for("mallory", "box", "nA")) is None  # another login
        assert (await d.lock_for("BOB", "anything", "nC")) is not None
        assert (await d.lock_for("bob", "anything", "nD")) is None
        assert (await d.lock_for("bob", "anything")) is None
        assert not await d.remove_lock("bob", None)  # the login lock is not the node-id lock
        assert await d.remove_lock("Bob", None, "nC")
        assert await d.remove_lock("eve", "box")
        assert await d.locks() == []


async def test_redis_locks_under_old_exact_keys_are_found_replaced_and_removed(
    redis_space: KeySpace,
) -> None:
    """Locks stored before keys were casefolded (the login as typed, no stable ids) are still
    enforced, replaced by a lock of the same login and node in any case, and removed by UNLOCK
    in any case."""
    name = redis_space.prefix + "console:{console}:locks"
    wall = Wall()

    def old(login: str, node: str | None, reason: str) -> tuple[str, str]:
        record = {"login": login, "node": node, "reason": reason, "by": "admin", "set_at": wall.now, "expires": None}
        return json.dumps([login, node], separators=(",", ":")), json.dumps(record)

    client = redis_space.client()
    async with open_state(redis_space.config(), instance_id="a") as store:
        assert isinstance(store, RedisStateStore)
        d = RedisDirectory(store, wall)
        client.hset(name, *old("Alice@Example.com", None, "old-1"))
        client.hset(name, *old("Eve@Example.com", "Box", "old-2"))
        assert sorted(lock.reason for lock in await d.locks()) == ["old-1", "old-2"]
        found = await d.lock_for("alice@example.com", "laptop")
        assert found is not None and found.reason == "old-1"
        assert (await d.lock_for("eve@example.com", "box")) is not None

        await d.set_lock(LockRecord("ALICE@example.com", None, "new", "admin", wall.now))
        [alice] = [lock for lock in await d.locks() if lock.login.casefold() == "alice@example.com"]
        assert alice.reason == "new"
        assert len(client.hkeys(name)) == 2

        assert await d.remove_lock("eve@example.com", "box")
        assert await d.remove_lock("alice@example.com", None)
        assert client.hkeys(name) == []
        assert await d.lock_for("eve@example.com", "box") is None
    client.close()


async def test_redis_lock_records_keep_the_shape_older_instances_read(redis_space: KeySpace) -> None:
    """An instance of an older version reads a lock record only when it has exactly the fields
    it knows: the stable ids are kept in a field of their own, so it still enforces a node lock
    by its name, and reads a lock by stable id as a lock on the whole login (more, not less)."""
    name = redis_space.prefix + "console:{console}:locks"
    known = {"login", "node", "reason", "by", "set_at", "expires"}
    wall = Wall()
    client = redis_space.client()
    async with open_state(redis_space.config(), instance_id="a") as store:
        assert isinstance(store, RedisStateStore)
        d = RedisDirectory(store, wall)
        await d.set_lock(LockRecord("Eve", "Box", "r", "admin", wall.now, None, ("nA",)))
        await d.set_lock(LockRecord("bob", None, "r", "admin", wall.now, None, ("nB",)))
        records = {
            k.decode(): json.loads(v) for k, v in client.hgetall(name).items() if not k.startswith(b"ids:")
        }
        assert records[lock_key("eve", "box")]["node"] == "Box"
        assert records[lock_key("bob", None, "nB")]["node"] is None
        assert all(set(r) == known for r in records.values())
        assert sorted(lock.node_ids for lock in await d.locks()) == [("nA",), ("nB",)]
        # Set again without ids (no session now): the old ids field goes with the old record.
        await d.set_lock(LockRecord("eve", "box", "r2", "admin", wall.now))
        [eve] = [lock for lock in await d.locks() if lock.login == "eve"]
        assert eve.node_ids == ()
        assert await d.remove_lock("bob", None, "nB")
        assert await d.remove_lock("EVE", "BOX")
        assert client.hkeys(name) == []
    client.close()


async def test_redis_locks_outlive_the_store_that_set_them(redis_space: KeySpace) -> None:
    wall = Wall()
    cfg = redis_space.config()
    async with open_state(cfg, instance_id="a") as store:
        assert isinstance(store, RedisStateStore)
        await RedisDirectory(store, wall).set_lock(LockRecord("bob", None, "r", "admin", wall.now))
    async with open_state(cfg, instance_id="b") as store:
        assert isinstance(store, RedisStateStore)
        [lock] = await RedisDirectory(store, wall).locks()
        assert (lock.login, lock.reason, lock.by) == ("bob", "r", "admin")


async def test_hostile_values_in_redis_are_skipped(redis_space: KeySpace) -> None:
    prefix = redis_space.prefix
    async with open_state(redis_space.config(), instance_id="a") as store:
        assert isinstance(store, RedisStateStore)
        d = RedisDirectory(store, Wall())
        client = redis_space.client()
        client.hset(prefix + "console:{console}:locks", "x", "not json")
        client.hset(prefix + "console:{console}:locks", "y", '{"login": 1}')
        bad = {"login": "x", "node": None, "reason": "r", "by": "b", "set_at": 1.0}
        for extra in ({"node_ids": "nA"}, {"node_ids": [1]}, {"login": 7}, {"set_at": "1"}, {"expires": "x"}):
            client.hset(prefix + "console:{console}:locks", json.dumps(extra), json.dumps(bad | extra))
        for i, ids in enumerate(("not json", "[1]", '"nA"', '{"a": 1}')):
            client.hset(prefix + "console:{console}:locks", f"ids:{i}", ids)
        client.rpush(prefix + "console:{console}:kills:a", "[]")
        client.zadd(prefix + "console:{console}:instances", {"z": 10**15})
        client.set(prefix + "console:{console}:sessions:z", '{"instance": "z"}')
        assert await d.locks() == []
        assert await d.lock_for("x", "y") is None
        assert await d.take_kills("a") == []
        assert await d.instances() == []
        client.close()


# -- the hub -------------------------------------------------------------------------------


class FakeRelay:
    def __init__(self) -> None:
        self.fatal: bytes | None = None
        self.bytes_from_client = 10
        self.bytes_from_backend = 20
        self.buffered_bytes = 0

    def terminate(self, fatal: bytes, *, timeout: float = 2.0) -> None:
        self.fatal = fatal

    async def wait(self) -> Any:  # pragma: no cover - not used
        raise NotImplementedError


def live(conn_id: str, login: str, node: str, node_id: str = "") -> tuple[LiveSession, FakeRelay]:
    session = LiveSession(
        conn_id=conn_id,
        listener="pg-main",
        peer=("127.0.0.2", 5000),
        identity=Identity(login, node, node_id=node_id),
        grant=EffectiveGrant("pg-main", "app"),
        database="app",
        preset_cap=None,
        role="wp_role",
        started=trio.current_time(),
    )
    relay = FakeRelay()
    session.attach(relay)
    return session, relay


def caller(access: str) -> Caller:
    return Caller(Identity("admin@example.com", "ops"), access, "pg-main", "c0", "127.0.0.1:1")


async def test_hub_lock_ends_sessions_refuses_logins_and_is_audited() -> None:
    wall = Wall()
    registry = SessionRegistry()
    hub = ConsoleHub(registry, MemoryDirectory(wall), "a", wall)
    bob, bob_relay = live("c1", "bob", "laptop")
    eve, eve_relay = live("c2", "eve", "box")
    registry.add(bob)
    registry.add(eve)

    result = await hub.execute(caller("admin"), "SHOW SESSIONS")
    assert isinstance(result, Result) and sorted(r[0] for r in result.rows) == ["c1", "c2"]
    assert {r[11:13] for r in result.rows} == {("10", "20")}

    with capture_logs() as logs:
        result = await hub.execute(caller("admin"), "LOCK LOGIN 'bob' FOR '10m' REASON 'stolen'")
    assert result == Result("LOCK")
    assert bob_relay.fatal is not None and b"57P01" in bob_relay.fatal and b"admin@example.com" in bob_relay.fatal
    assert eve_relay.fatal is None
    [event] = logs.events("console_command")
    assert event["login"] == "admin@example.com" and event["statement"].startswith("LOCK LOGIN")

    refusal = await hub.lock_refusal(Identity("bob", "other-node"))
    assert refusal is not None and refusal.sqlstate == "28000" and "stolen" in refusal.message
    assert await hub.lock_refusal(Identity("eve", "box")) is None
    wall.now += 601
    assert await hub.lock_refusal(Identity("bob", "laptop")) is None


async def test_hub_read_only_may_only_show() -> None:
    registry = SessionRegistry()
    hub = ConsoleHub(registry, MemoryDirectory(Wall()), "a", Wall())
    bob, relay = live("c1", "bob", "laptop")
    registry.add(bob)
    for sql in ("KILL 'c1'", "KILL LOGIN 'bob'", "LOCK LOGIN 'bob' REASON 'x'", "UNLOCK LOGIN 'bob'"):
        with capture_logs() as logs:
            result = await hub.execute(caller("read"), sql)
        assert isinstance(result, StatementError) and result.sqlstate == "42501", sql
        assert logs.events("console_command")[0]["sqlstate"] == "42501"
    assert relay.fatal is None
    assert isinstance(await hub.execute(caller("read"), "SHOW LOCKS"), Result)


async def test_hub_tick_applies_remote_kills_and_locks() -> None:
    wall = Wall()
    shared = MemoryDirectory(wall)
    registry_a, registry_b = SessionRegistry(), SessionRegistry()
    hub_a = ConsoleHub(registry_a, shared, "a", wall)
    hub_b = ConsoleHub(registry_b, shared, "b", wall)
    on_b, relay = live("c9", "bob", "laptop")
    registry_b.add(on_b)
    await hub_b.tick()  # B publishes
    result = await hub_a.execute(caller("admin"), "KILL 'c9'")
    assert result == Result("KILL 1") and relay.fatal is None  # not A's to end
    await hub_b.tick()
    assert relay.fatal is not None and b"admin@example.com" in relay.fatal

    other, other_relay = live("c10", "eve", "box")
    registry_b.add(other)
    await hub_a.execute(caller("admin"), "LOCK LOGIN 'eve' NODE 'box' REASON 'r'")
    assert other_relay.fatal is None
    await hub_b.tick()
    assert other_relay.fatal is not None and b"locked: r" in other_relay.fatal


async def test_hub_locks_and_kills_every_case_of_a_login() -> None:
    wall = Wall()
    registry = SessionRegistry()
    hub = ConsoleHub(registry, MemoryDirectory(wall), "a", wall)
    bob, bob_relay = live("c1", "bob@example.com", "laptop")
    registry.add(bob)
    assert await hub.execute(caller("admin"), "LOCK LOGIN 'Bob@Example.COM' REASON 'r'") == Result("LOCK")
    assert bob_relay.fatal is not None
    assert await hub.lock_refusal(Identity("bob@example.com", "laptop")) is not None
    assert await hub.execute(caller("admin"), "LOCK LOGIN 'bob@example.com' REASON 'r2'") == Result("LOCK")
    result = await hub.execute(caller("admin"), "SHOW LOCKS")
    assert isinstance(result, Result) and [r[2] for r in result.rows] == ["r2"]
    assert await hub.execute(caller("admin"), "UNLOCK LOGIN 'BOB@example.com'") == Result("UNLOCK 1")
    assert await hub.lock_refusal(Identity("bob@example.com", "laptop")) is None

    registry.remove(bob)
    again, relay = live("c2", "bob@example.com", "Laptop")
    registry.add(again)
    assert await hub.execute(caller("admin"), "KILL LOGIN 'BOB@EXAMPLE.COM' NODE 'laptop'") == Result("KILL 1")
    assert relay.fatal is not None


async def test_hub_node_lock_follows_the_node_across_a_rename() -> None:
    """LOCK ... NODE records the stable ids of the live sessions (on every instance) of that
    login on that node: the device renamed comes back under another name and is still locked;
    another device of the login is not. ``NODE ID`` locks (and kills) by stable id."""
    wall = Wall()
    shared = MemoryDirectory(wall)
    registry_a, registry_b = SessionRegistry(), SessionRegistry()
    hub_a = ConsoleHub(registry_a, shared, "a", wall)
    hub_b = ConsoleHub(registry_b, shared, "b", wall)
    on_b, relay = live("c1", "eve@example.com", "eve-box", node_id="nEVE1")
    registry_b.add(on_b)
    await hub_b.tick()  # B publishes its session (with the stable id)
    result = await hub_a.execute(caller("read"), "SHOW SESSIONS")
    assert isinstance(result, Result) and result.columns[-1] == "node_id"
    assert [(row[0], row[-1]) for row in result.rows] == [("c1", "nEVE1")]
    result = await hub_a.execute(caller("admin"), "LOCK LOGIN 'eve@example.com' NODE 'EVE-BOX' REASON 'r'")
    assert result == Result("LOCK")
    result = await hub_a.execute(caller("read"), "SHOW LOCKS")
    assert isinstance(result, Result) and result.columns[-1] == "node_ids"
    assert [row[-1] for row in result.rows] == ["nEVE1"]
    await hub_b.tick()
    assert relay.fatal is not None and b"locked: r" in relay.fatal

    renamed = Identity("eve@example.com", "renamed-box", node_id="nEVE1")
    assert await hub_a.lock_refusal(renamed) is not None
    assert await hub_b.lock_refusal(renamed) is not None
    assert await hub_a.lock_refusal(Identity("eve@example.com", "other", node_id="nEVE2")) is None

    # Set again (a new reason) with the device gone: the stable id stays with the lock.
    registry_b.remove(on_b)
    await hub_a.execute(caller("admin"), "LOCK LOGIN 'eve@example.com' NODE 'eve-box' REASON 'r2'")
    refusal = await hub_a.lock_refusal(renamed)
    assert refusal is not None and "r2" in refusal.message
    # A renamed session that is live (it got in before the lock) is ended by the tick too.
    back, back_relay = live("c2", "eve@example.com", "renamed-box", node_id="nEVE1")
    registry_b.add(back)
    await hub_b.tick()
    assert back_relay.fatal is not None
    registry_b.remove(back)
    await hub_b.tick()
    assert await hub_a.execute(caller("admin"), "UNLOCK LOGIN 'eve@example.com' NODE 'eve-box'") == Result(
        "UNLOCK 1"
    )
    assert await hub_a.lock_refusal(renamed) is None

    other, other_relay = live("c3", "eve@example.com", "phone", node_id="nEVE2")
    registry_a.add(other)
    await hub_a.execute(caller("admin"), "LOCK LOGIN 'eve@example.com' NODE ID 'nEVE2' REASON 'by id'")
    assert other_relay.fatal is not None
    assert await hub_a.lock_refusal(Identity("eve@example.com", "any-name", node_id="nEVE2")) is not None
    assert await hub_a.lock_refusal(renamed) is None
    assert await hub_a.execute(caller("admin"), "UNLOCK LOGIN 'eve@example.com' NODE ID 'nEVE2'") == Result(
        "UNLOCK 1"
    )
    assert await hub_a.lock_refusal(Identity("eve@example.com", "any-name", node_id="nEVE2")) is None

    registry_a.remove(other)
    last, last_relay = live("c4", "eve@example.com", "x", node_id="nEVE2")
    registry_a.add(last)
    assert await hub_a.execute(caller("admin"), "KILL LOGIN 'eve@example.com' NODE ID 'nEVE1'") == Result("KILL 0")
    assert await hub_a.execute(caller("admin"), "KILL LOGIN 'eve@example.com' NODE ID 'nEVE2'") == Result("KILL 1")
    assert last_relay.fatal is not None


async def test_lock_check_fails_closed_when_state_is_unavailable() -> None:
    class Down(MemoryDirectory):
        async def lock_for(self, login: str, node: str, node_id: str = "") -> LockRecord | None:
            from waypoint.state.base import StateUnavailableError

            raise StateUnavailableError("Redis did not answer")

    hub = ConsoleHub(SessionRegistry(), Down(Wall()), "a", Wall())
    refusal = await hub.lock_refusal(Identity("bob", "laptop"))
    assert refusal is not None and refusal.sqlstate == "08004"
