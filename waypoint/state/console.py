"""What the console shares between instances: session lists, kill requests and login locks.

Two implementations: :class:`MemoryDirectory` (one process) and :class:`RedisDirectory` (on the
Redis of :class:`~waypoint.state.redis_store.RedisStateStore`, so every instance sees them).

Redis keys (under the ``[state] key_prefix``):

- ``console:instances``: a sorted set, instance id → when its list expires (ms since the epoch);
- ``console:sessions:<instance>``: that instance's live sessions (JSON), with a TTL, rewritten
  every publish interval: an instance that dies drops out within the TTL;
- ``console:kills:<instance>``: a list of kill requests that instance takes and acts on;
- ``console:locks``: a hash, lock key → lock record (JSON). Locks carry their own wall-clock
  expiry (checked on every read) and survive restarts.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

from waypoint.state.base import StateUnavailableError
from waypoint.state.redis_client import UNAVAILABLE
from waypoint.state.redis_store import RedisStateStore, _part

#: Longest JSON value read back from Redis (anyone who can write Redis could make it huge).
MAX_VALUE = 32 * 1024 * 1024


@attrs.frozen
class SessionRecord:
    conn_id: str
    instance: str
    listener: str
    login: str
    node: str
    database: str
    role: str
    client_addr: str
    tls: bool
    started: float  # wall clock
    state: str
    bytes_in: int
    bytes_out: int
    statement: str = ""


@attrs.frozen
class InstanceRecord:
    instance: str
    started: float  # wall clock
    last_seen: float
    sessions: tuple[SessionRecord, ...] = ()


@attrs.frozen
class KillRequest:
    conn_id: str
    by: str
    reason: str = ""


@attrs.frozen
class LockRecord:
    login: str
    node: str | None
    reason: str
    by: str
    set_at: float  # wall clock
    expires: float | None = None  # wall clock; None: until UNLOCK

    @property
    def key(self) -> str:
        return lock_key(self.login, self.node)

    def applies(self, login: str, node: str) -> bool:
        return self.login == login and (self.node is None or self.node == node)

    def live(self, now: float) -> bool:
        return self.expires is None or self.expires > now


def lock_key(login: str, node: str | None) -> str:
    return json.dumps([login, node], separators=(",", ":"))


def _encode_instance(rec: InstanceRecord) -> str:
    return json.dumps(attrs.asdict(rec), separators=(",", ":"))


def _decode_instance(text: str | bytes) -> InstanceRecord | None:
    try:
        data = json.loads(text)
        sessions = tuple(SessionRecord(**s) for s in data.pop("sessions"))
        return InstanceRecord(**data, sessions=sessions)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _decode_lock(text: str | bytes) -> LockRecord | None:
    try:
        return LockRecord(**json.loads(text))
    except (ValueError, TypeError):
        return None


def _decode_kill(text: str | bytes) -> KillRequest | None:
    try:
        return KillRequest(**json.loads(text))
    except (ValueError, TypeError):
        return None


class ConsoleDirectory(Protocol):
    async def publish(self, record: InstanceRecord, ttl: float) -> None: ...

    async def instances(self) -> list[InstanceRecord]:
        """Every instance whose list has not expired (this one included)."""
        ...

    async def withdraw(self, instance: str) -> None: ...

    async def request_kill(self, instance: str, request: KillRequest) -> None: ...

    async def take_kills(self, instance: str) -> list[KillRequest]: ...

    async def set_lock(self, lock: LockRecord) -> None: ...

    async def remove_lock(self, login: str, node: str | None) -> bool: ...

    async def locks(self) -> list[LockRecord]:
        """Every lock still in force."""
        ...

    async def lock_for(self, login: str, node: str) -> LockRecord | None:
        """The lock in force on ``login`` (on any node, or on ``node``), if any."""
        ...


@attrs.define(eq=False)
class MemoryDirectory:
    """One process: the same operations on dicts."""

    wall: Callable[[], float]
    _instances: dict[str, tuple[InstanceRecord, float]] = attrs.field(factory=dict)
    _kills: dict[str, list[KillRequest]] = attrs.field(factory=dict)
    _locks: dict[str, LockRecord] = attrs.field(factory=dict)

    async def publish(self, record: InstanceRecord, ttl: float) -> None:
        self._instances[record.instance] = (record, self.wall() + ttl)

    async def instances(self) -> list[InstanceRecord]:
        now = self.wall()
        return [rec for rec, expires in self._instances.values() if expires > now]

    async def withdraw(self, instance: str) -> None:
        self._instances.pop(instance, None)

    async def request_kill(self, instance: str, request: KillRequest) -> None:
        self._kills.setdefault(instance, []).append(request)

    async def take_kills(self, instance: str) -> list[KillRequest]:
        return self._kills.pop(instance, [])

    async def set_lock(self, lock: LockRecord) -> None:
        self._locks[lock.key] = lock

    async def remove_lock(self, login: str, node: str | None) -> bool:
        return self._locks.pop(lock_key(login, node), None) is not None

    async def locks(self) -> list[LockRecord]:
        now = self.wall()
        for key in [k for k, v in self._locks.items() if not v.live(now)]:
            del self._locks[key]
        return list(self._locks.values())

    async def lock_for(self, login: str, node: str) -> LockRecord | None:
        now = self.wall()
        for key in (lock_key(login, None), lock_key(login, node)):
            lock = self._locks.get(key)
            if lock is not None and lock.live(now):
                return lock
        return None


@attrs.define(eq=False)
class RedisDirectory:
    """The same on the Redis of ``store`` (its client, timeouts and worker threads)."""

    store: RedisStateStore
    wall: Callable[[], float]

    def _key(self, *parts: str) -> str:
        # One cluster hash tag for every console key: MGET and the pipelines name several.
        return self.store._layout.prefix + "console:{console}:" + ":".join(_part(p) for p in parts)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return await self.store._run(fn)
        except UNAVAILABLE as exc:
            raise StateUnavailableError(f"shared state (Redis) unavailable: {exc}") from exc

    async def publish(self, record: InstanceRecord, ttl: float) -> None:
        client = self.store._client
        ms = max(1, int(ttl * 1000))
        expires = int((self.wall() + ttl) * 1000)

        def go() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.set(self._key("sessions", record.instance), _encode_instance(record), px=ms)
            pipe.zadd(self._key("instances"), {record.instance: expires})
            pipe.execute()

        await self._call(go)

    async def instances(self) -> list[InstanceRecord]:
        client = self.store._client
        now_ms = int(self.wall() * 1000)

        def go() -> list[Any]:
            client.zremrangebyscore(self._key("instances"), "-inf", now_ms)
            ids = client.zrangebyscore(self._key("instances"), now_ms, "+inf")
            if not ids:
                return []
            names = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
            values: list[Any] = client.mget([self._key("sessions", n) for n in names])
            return values

        out: list[InstanceRecord] = []
        for raw in await self._call(go):
            if raw is None or len(raw) > MAX_VALUE:
                continue
            rec = _decode_instance(raw)
            if rec is not None:
                out.append(rec)
        return out

    async def withdraw(self, instance: str) -> None:
        client = self.store._client

        def go() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.delete(self._key("sessions", instance))
            pipe.zrem(self._key("instances"), instance)
            pipe.execute()

        await self._call(go)

    async def request_kill(self, instance: str, request: KillRequest) -> None:
        client = self.store._client
        key = self._key("kills", instance)
        value = json.dumps(attrs.asdict(request), separators=(",", ":"))

        def go() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.rpush(key, value)
            pipe.pexpire(key, 60_000)
            pipe.execute()

        await self._call(go)

    async def take_kills(self, instance: str) -> list[KillRequest]:
        client = self.store._client
        key = self._key("kills", instance)

        def go() -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.lrange(key, 0, 999)
            pipe.ltrim(key, 1000, -1)
            result: list[Any] = pipe.execute()[0]
            return result

        found = [_decode_kill(raw) for raw in await self._call(go) if len(raw) <= MAX_VALUE]
        return [k for k in found if k is not None]

    async def set_lock(self, lock: LockRecord) -> None:
        value = json.dumps(attrs.asdict(lock), separators=(",", ":"))
        await self._call(
            functools.partial(self.store._client.hset, self._key("locks"), lock.key, value)
        )

    async def remove_lock(self, login: str, node: str | None) -> bool:
        removed = await self._call(
            functools.partial(self.store._client.hdel, self._key("locks"), lock_key(login, node))
        )
        return bool(removed)

    async def locks(self) -> list[LockRecord]:
        raw: dict[Any, Any] = await self._call(
            functools.partial(self.store._client.hgetall, self._key("locks"))
        )
        now = self.wall()
        out = []
        for value in raw.values():
            lock = _decode_lock(value) if len(value) <= MAX_VALUE else None
            if lock is not None and lock.live(now):
                out.append(lock)
        return out

    async def lock_for(self, login: str, node: str) -> LockRecord | None:
        keys: Sequence[str] = (lock_key(login, None), lock_key(login, node))
        raw: list[Any] = await self._call(
            functools.partial(self.store._client.hmget, self._key("locks"), list(keys))
        )
        now = self.wall()
        for value in raw:
            if value is None or len(value) > MAX_VALUE:
                continue
            lock = _decode_lock(value)
            if lock is not None and lock.live(now):
                return lock
        return None
