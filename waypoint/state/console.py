"""What the console shares between instances: session lists, kill requests and login locks.

Two implementations: :class:`MemoryDirectory` (one process) and :class:`RedisDirectory` (on the
Redis of :class:`~waypoint.state.redis_store.RedisStateStore`, so every instance sees them).

Redis keys (under the ``[state] key_prefix``):

- ``console:instances``: a sorted set, instance id → when its list expires (ms since the epoch);
- ``console:sessions:<instance>``: that instance's live sessions (JSON), with a TTL, rewritten
  every publish interval: an instance that dies drops out within the TTL;
- ``console:kills:<instance>``: a list of kill requests that instance takes and acts on;
- ``console:locks``: a hash, lock key → lock record (JSON), and ``ids:`` + lock key → the
  stable ids that lock also covers (a JSON list). Locks carry their own wall-clock expiry
  (checked on every read) and survive restarts. The ids have a field of their own so that an
  instance of an older version, which reads records of the fields it knows only, still
  enforces the lock by its name (a lock by stable id reads there as a lock on the whole login:
  more than asked, never less).

A lock matches logins and node names regardless of case (both are case-insensitive at
Tailscale: e-mail-like logins and DNS host names), compared casefolded; over-matching case
variants of one login is the safe direction for a lock. A lock that names a node also carries
the stable ids of the nodes that had that name when it was set, so renaming the device does
not lift it. Lock keys are built from the casefolded names, but every read matches on the
records themselves, so a lock stored under an older key (the login as typed) is still found,
replaced and removed.
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
#: Before a lock's key, the field of the stable ids that lock covers.
_IDS = b"ids:"


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
    node_id: str = ""  # the node's stable id ("" when unknown)


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


def _node_ids(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise TypeError("node_ids must be a list of strings")
    return tuple(value)


@attrs.frozen
class LockRecord:
    """One lock. ``node`` None and no ``node_ids``: every node of the login. ``node`` set:
    the node of that name, or any node whose stable id is in ``node_ids`` (the nodes that had
    that name when the lock was set). ``node`` None with ``node_ids``: exactly those nodes
    (a lock by stable id)."""

    login: str
    node: str | None
    reason: str
    by: str
    set_at: float  # wall clock
    expires: float | None = None  # wall clock; None: until UNLOCK
    node_ids: tuple[str, ...] = attrs.field(default=(), converter=_node_ids)

    @property
    def node_id(self) -> str | None:
        """The stable id a lock by stable id names (None for a lock by login or node name)."""
        return self.node_ids[0] if self.node is None and self.node_ids else None

    @property
    def key(self) -> str:
        return lock_key(self.login, self.node, self.node_id)

    def applies(self, login: str, node: str, node_id: str = "") -> bool:
        return covers(self.login, self.node, self.node_ids, login, node, node_id)

    def live(self, now: float) -> bool:
        return self.expires is None or self.expires > now


def covers(
    login: str,
    node: str | None,
    node_ids: Sequence[str],
    their_login: str,
    their_node: str,
    their_node_id: str = "",
) -> bool:
    """Whether a lock or kill naming ``login`` (on node ``node``, or on the nodes of stable ids
    ``node_ids``; neither: every node) covers a caller. Names compare casefolded, stable ids
    exactly; an unknown stable id ("") matches none."""
    if their_login.casefold() != login.casefold():
        return False
    if node is None and not node_ids:
        return True
    if node is not None and their_node.casefold() == node.casefold():
        return True
    return bool(their_node_id) and their_node_id in node_ids


def lock_key(login: str, node: str | None, node_id: str | None = None) -> str:
    """Where a lock is kept: one key for every case variant of a login and node name."""
    parts: list[str | None] = [login.casefold(), None if node is None else node.casefold()]
    if node_id is not None:
        parts.append(node_id)
    return json.dumps(parts, separators=(",", ":"))


def _encode_lock(lock: LockRecord) -> str:
    """The record without its stable ids (kept beside it, see the module docstring)."""
    data = attrs.asdict(lock)
    del data["node_ids"]
    return json.dumps(data, separators=(",", ":"))


def _decode_ids(text: str | bytes) -> tuple[str, ...]:
    try:
        return _node_ids(json.loads(text))
    except (ValueError, TypeError):
        return ()


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
        lock = LockRecord(**json.loads(text))
    except (ValueError, TypeError):
        return None
    # Matching casefolds the names and compares the times: a record of other types is skipped.
    names_ok = isinstance(lock.login, str) and isinstance(lock.node, str | None)
    times_ok = isinstance(lock.set_at, int | float) and isinstance(lock.expires, int | float | None)
    return lock if names_ok and times_ok else None


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

    async def remove_lock(self, login: str, node: str | None, node_id: str | None = None) -> bool:
        """Remove the lock on ``login`` (on node ``node``, or on the node of stable id
        ``node_id``), whatever the case it was set with; False when there was none."""
        ...

    async def locks(self) -> list[LockRecord]:
        """Every lock still in force."""
        ...

    async def lock_for(self, login: str, node: str, node_id: str = "") -> LockRecord | None:
        """The lock in force on ``login`` (on any node, or on this node by its name ``node``
        or its stable id ``node_id``), if any."""
        ...


def _first_applying(
    locks: Sequence[LockRecord], login: str, node: str, node_id: str
) -> LockRecord | None:
    return next((lock for lock in locks if lock.applies(login, node, node_id)), None)


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

    async def remove_lock(self, login: str, node: str | None, node_id: str | None = None) -> bool:
        return self._locks.pop(lock_key(login, node, node_id), None) is not None

    async def locks(self) -> list[LockRecord]:
        now = self.wall()
        for key in [k for k, v in self._locks.items() if not v.live(now)]:
            del self._locks[key]
        return list(self._locks.values())

    async def lock_for(self, login: str, node: str, node_id: str = "") -> LockRecord | None:
        return _first_applying(await self.locks(), login, node, node_id)


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

    async def _stored_locks(self) -> dict[bytes, LockRecord]:
        """Every lock record in the hash that parses (expired ones too), with the stable ids
        kept beside it, by its field."""
        raw: dict[Any, Any] = await self._call(
            functools.partial(self.store._client.hgetall, self._key("locks"))
        )
        records: dict[bytes, Any] = {}
        ids: dict[bytes, tuple[str, ...]] = {}
        for field, value in raw.items():
            name = field if isinstance(field, bytes) else str(field).encode()
            if len(value) > MAX_VALUE:
                continue
            if name.startswith(_IDS):
                ids[name.removeprefix(_IDS)] = _decode_ids(value)
            else:
                records[name] = value
        out = {}
        for name, value in records.items():
            lock = _decode_lock(value)
            if lock is not None:
                extra = ids.get(name, ())
                if extra:
                    lock = attrs.evolve(lock, node_ids=(*lock.node_ids, *extra))
                out[name] = lock
        return out

    async def _fields_for(self, key: str) -> list[bytes]:
        """The fields that hold the lock of ``key`` (and its stable ids): its own, and any a
        lock of the same login and node has under an older key (the login as typed, before
        keys were casefolded)."""
        stored = await self._stored_locks()
        found = {key.encode(), *(f for f, lock in stored.items() if lock.key == key)}
        return [g for f in sorted(found) for g in (f, _IDS + f)]

    async def set_lock(self, lock: LockRecord) -> None:
        client = self.store._client
        name = self._key("locks")
        stale = await self._fields_for(lock.key)

        def go() -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hdel(name, *stale)
            pipe.hset(name, lock.key, _encode_lock(lock))
            if lock.node_ids:
                pipe.hset(name, _IDS + lock.key.encode(), json.dumps(list(lock.node_ids)))
            pipe.execute()

        await self._call(go)

    async def remove_lock(self, login: str, node: str | None, node_id: str | None = None) -> bool:
        key = lock_key(login, node, node_id)
        fields: list[Any] = await self._fields_for(key)  # bytes: as Redis gave them
        removed = await self._call(
            functools.partial(self.store._client.hdel, self._key("locks"), *fields)
        )
        return bool(removed)

    async def locks(self) -> list[LockRecord]:
        now = self.wall()
        return [lock for lock in (await self._stored_locks()).values() if lock.live(now)]

    async def lock_for(self, login: str, node: str, node_id: str = "") -> LockRecord | None:
        # Every lock is read: one that names a node may match by its stable ids, and one kept
        # under an older key is found by its record, not its key.
        return _first_applying(await self.locks(), login, node, node_id)
