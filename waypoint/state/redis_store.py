"""Shared state in Redis, for several Waypoint instances behind one address.

Transport: redis-py's synchronous client in worker threads under one
``trio.CapacityLimiter`` (see docs/scaling.md for why not trio-asyncio). Every call is
bounded twice: socket timeouts on the connection and ``trio.fail_after`` around the thread.

Slot counts are per-instance leases. Each limit key is a hash with two fields per
instance: ``c:<instance>`` (its live sessions) and ``e:<instance>`` (when that count expires,
in Redis server milliseconds). The acquire script drops entries whose expiry passed, so the
slots of an instance that died come back after ``lease``. A live instance's maintenance task
re-asserts its own count on every key it holds every ``lease / 3`` (also repairing any write
that failed), and refreshes ``{prefix}instance:<id>``.

One user's keys share a cluster hash tag (``{<principal>}``) and are changed by one script;
the deployment total lives on its own key and is changed by a second script, so no script
ever touches two cluster slots.

Where Redis is and how it is reached (one server, Sentinel, Cluster; TLS) is
:mod:`waypoint.state.redis_client`. No client retries a command: a script whose answer was
lost may have run, and running it again would count twice; the store marks the keys for
repair instead. Every new connection (a restart, a failover, a topology change) may reach a
server that lost the last acknowledged writes, so it makes the store re-assert everything it
holds.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import trio
from attrs import define, field
from redis.exceptions import NoScriptError

from waypoint import errors
from waypoint.errors import Refusal
from waypoint.observability.log import get_logger
from waypoint.state.base import (
    LIMIT_TOTAL,
    LIMIT_USER,
    CancelTable,
    CancelTarget,
    LockToken,
    SlotLease,
    SlotRequest,
    SlotUsage,
    StateUnavailableError,
    cancel_key_digest,
    limit_listener,
    validate_cancel_args,
)
from waypoint.state.redis_client import UNAVAILABLE, RedisClient

log = get_logger("state")

T = TypeVar("T")

_RETRY_MIN = 0.05
# Longest cancel-key value read back (an encoded CancelTarget is far shorter).
MAX_CANCEL_VALUE = 4096
_LOCK_POLL_MIN = 0.01
_LOCK_POLL_MAX = 0.2

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Sum the live counts of KEY, deleting entries of instances whose lease expired. An entry is
# c:<id> (count; absent = 0), e:<id> (when it stops counting) and s:<id> (the fence: the epoch
# of that instance's last re-assertion; writes carrying an older epoch are stale, see below).
_LIVE_COUNT = """
local function live_count(key, now)
  local flat = redis.call('HGETALL', key)
  local counts, exps, fences = {}, {}, {}
  for j = 1, #flat, 2 do
    local f, v = flat[j], tonumber(flat[j + 1])
    local kind, id = string.sub(f, 1, 2), string.sub(f, 3)
    if kind == 'c:' then counts[id] = v
    elseif kind == 'e:' then exps[id] = v
    elseif kind == 's:' then fences[id] = v end
  end
  local total = 0
  for id, e in pairs(exps) do
    if e < now then
      redis.call('HDEL', key, 'c:' .. id, 'e:' .. id, 's:' .. id)
    elseif counts[id] ~= nil then
      total = total + counts[id]
    end
  end
  for id, _ in pairs(counts) do
    if exps[id] == nil then redis.call('HDEL', key, 'c:' .. id) end
  end
  for id, _ in pairs(fences) do
    if exps[id] == nil then redis.call('HDEL', key, 's:' .. id) end
  end
  return total
end
local function keep(key, lease)
  if redis.call('PTTL', key) < 2 * lease then redis.call('PEXPIRE', key, 2 * lease) end
end
"""

# True when KEY's fence for instance IID is newer than EPOCH: the write was sent before this
# instance's last re-assertion of the key (a write whose answer timed out, executed late by a
# Redis that stalled), which already accounts for it.
_FENCED = """
local function fenced(key, iid, epoch)
  local s = redis.call('HGET', key, 's:' .. iid)
  return s and tonumber(s) > epoch
end
"""

# KEYS: limit keys (one cluster slot). ARGV: instance, lease_ms, epoch, limit per key (0 =
# none), then per key 1 if this instance holds sessions there (optional; 0 = no check).
# Returns {0, 0} when granted (every key incremented), {-1, 0} when stale (fenced), {-2, 0}
# when a key this instance holds sessions on has no live entry of it (Redis lost writes it
# acknowledged: a restart, a failover; or the entry's lease ran out), else {index of the
# full key, count}. Only acquires and re-assertions write e:, and nothing but its expiry
# removes it, so the check holds whatever order this instance's concurrent scripts run in.
ACQUIRE_LUA = (
    _NOW_MS
    + _LIVE_COUNT
    + _FENCED
    + """
local iid, lease, epoch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  if fenced(key, iid, epoch) then return {-1, 0} end
end
for i, key in ipairs(KEYS) do
  if (tonumber(ARGV[3 + #KEYS + i]) or 0) > 0 then
    local until_ms = tonumber(redis.call('HGET', key, 'e:' .. iid) or '0')
    if until_ms < now then return {-2, 0} end
  end
end
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 + i])
  local n = live_count(key, now)
  if limit > 0 and n >= limit then return {i, n} end
end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'c:' .. iid, 1)
  redis.call('HSET', key, 'e:' .. iid, now + lease)
  keep(key, lease)
end
return {0, 0}
"""
)

# KEYS: limit keys (one slot). ARGV: instance, epoch. Gives back one slot on each key; returns
# 1, or 0 when stale (fenced). At zero the count field goes; e: and s: stay until e: passes,
# so the fence outlives the count.
RELEASE_LUA = (
    _FENCED
    + """
local iid, epoch = ARGV[1], tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  if fenced(key, iid, epoch) then return 0 end
end
for _, key in ipairs(KEYS) do
  local v = redis.call('HINCRBY', key, 'c:' .. iid, -1)
  if v <= 0 then redis.call('HDEL', key, 'c:' .. iid) end
  if redis.call('HLEN', key) == 0 then redis.call('DEL', key) end
end
return 1
"""
)

# KEYS: one limit key. ARGV: instance, count, lease_ms, epoch (newer than any write this
# instance sent to the key before). Sets this instance's count (idempotent) and its fence, so
# that older writes still queued in a stalled Redis are ignored; returns 0 if itself stale.
RECONCILE_LUA = (
    _NOW_MS
    + _LIVE_COUNT
    + _FENCED
    + """
local iid, count, lease, epoch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local key = KEYS[1]
if fenced(key, iid, tonumber(epoch)) then return 0 end
if count > 0 then
  redis.call('HSET', key, 'c:' .. iid, count)
else
  redis.call('HDEL', key, 'c:' .. iid)
end
redis.call('HSET', key, 'e:' .. iid, now + lease, 's:' .. iid, epoch)
keep(key, lease)
return 1
"""
)

# KEYS: one limit key. ARGV: instance, lease_ms. Extends this instance's entry if present
# (commutes with concurrent acquires and releases of the same instance).
REFRESH_LUA = (
    _NOW_MS
    + _LIVE_COUNT
    + """
local iid, lease = ARGV[1], tonumber(ARGV[2])
local key = KEYS[1]
if redis.call('HEXISTS', key, 'c:' .. iid) == 1 then
  redis.call('HSET', key, 'e:' .. iid, now + lease)
  keep(key, lease)
end
return 1
"""
)

# KEYS: limit keys. Returns the live count of each.
COUNT_LUA = (
    _NOW_MS
    + _LIVE_COUNT
    + """
local out = {}
for i, key in ipairs(KEYS) do out[i] = live_count(key, now) end
return out
"""
)

# KEYS: the lock key. ARGV: token, ttl_ms. Takes the lock when it is free, and also when the
# token already holds it: a try whose answer was lost (it timed out after Redis ran it) may
# have taken the lock, and the next try must find it its own instead of waiting out the ttl.
# Returns 1 when the token holds the lock (for ttl_ms from now), else 0.
LOCK_LUA = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: the lock key. ARGV: token. Deletes the lock only if the token still owns it.
UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# What _change_once returns when an acquire found Redis missing this instance's counts.
_LOST = object()


def _script_entry(text: str) -> tuple[bytes, str]:
    body = text.encode()
    return body, hashlib.sha1(body, usedforsecurity=False).hexdigest()


# Every script, by name: its text and SHA-1 (what EVALSHA names it by).
SCRIPTS: dict[str, tuple[bytes, str]] = {
    "acquire": _script_entry(ACQUIRE_LUA),
    "release": _script_entry(RELEASE_LUA),
    "reconcile": _script_entry(RECONCILE_LUA),
    "refresh": _script_entry(REFRESH_LUA),
    "count": _script_entry(COUNT_LUA),
    "lock": _script_entry(LOCK_LUA),
    "unlock": _script_entry(UNLOCK_LUA),
}


def _part(text: str) -> str:
    """Encode a key component: braces (cluster hash tags) and '%' can never come from data."""
    return quote(text, safe="@.-_+:=/ ")


@define
class KeyLayout:
    """Where everything lives in Redis (see docs/scaling.md)."""

    prefix: str

    def user(self, principal: str) -> str:
        return f"{self.prefix}slots:{{{_part(principal)}}}:user"

    def user_listener(self, principal: str, listener: str) -> str:
        return f"{self.prefix}slots:{{{_part(principal)}}}:listener:{_part(listener)}"

    def total(self) -> str:
        return f"{self.prefix}slots:total"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}instance:{_part(instance_id)}"

    def cancel(self, pid: int, secret: bytes) -> str:
        return f"{self.prefix}cancel:{cancel_key_digest(pid, secret)}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}lock:{_part(name)}"


@define
class _Held:
    """This instance's view of one limit key."""

    confirmed: int = 0  # sessions of this instance counted on the key
    in_flight: int = 0  # scripts changing the key right now
    dirty: bool = False  # Redis may disagree with ``confirmed``: re-assert it
    reconciling: trio.Event | None = None
    idle: trio.Event | None = None  # set when in_flight drops to zero (someone waits for it)


@define(eq=False)  # a store is a thing, compared by identity
class RedisStateStore:
    """A :class:`~waypoint.state.base.StateStore` on Redis. Open it with
    :func:`waypoint.state.open_state`, which also runs :meth:`run_maintenance`; a store whose
    maintenance does not run behaves like an instance that died: its slots expire after
    ``lease``."""

    _client: RedisClient
    _layout: KeyLayout
    _lease: float
    instance_id: str
    _limiter: trio.CapacityLimiter
    _op_timeout: float
    _held: dict[str, _Held] = field(factory=dict)
    _leases: dict[str, SlotLease] = field(factory=dict)
    _cancel: CancelTable = field(factory=CancelTable)
    _wake: trio.Event = field(factory=trio.Event)
    # Fencing epoch: writes carry the current one, each re-assertion takes a new one. Starts
    # at the wall clock in microseconds, so a restarted process with the same id is newer.
    _epoch: int = field(init=False, factory=lambda: time.time_ns() // 1000)
    _closed: bool = False
    # Held for every write of the instance key: the close's DELETE waits for a heartbeat SET
    # in flight, and a heartbeat that takes it after the close began writes nothing.
    _instance_lock: trio.Lock = field(factory=trio.Lock)
    # Set from a worker thread when a new connection to Redis was made (see
    # :meth:`note_new_connection`); read and cleared on the trio side.
    _reconnected: bool = False

    def __attrs_post_init__(self) -> None:
        if self._lease <= 0:
            raise ValueError("[state] lease must be positive")

    def note_new_connection(self) -> None:
        """Called in a worker thread after each new connection to a Redis server. That server
        may be a replica just promoted, or a restarted one, missing the writes its predecessor
        acknowledged last: the next calls re-assert every count this instance holds."""
        self._reconnected = True

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self._lease * 1000))

    # -- transport ---------------------------------------------------------------------------

    async def _run(
        self, fn: Callable[[], T], timeout: float | None = None, *, abandon: bool = True
    ) -> T:
        """Run one call in a worker thread. With ``abandon=False`` a cancellation (or the
        timeout) waits for the call to end instead of leaving it running behind: for a write
        that must not land after what follows it; the client's socket timeouts bound it."""
        try:
            with trio.fail_after(self._op_timeout if timeout is None else timeout):
                return await trio.to_thread.run_sync(
                    fn, limiter=self._limiter, abandon_on_cancel=abandon
                )
        finally:
            if self._reconnected:
                self._reconnected = False
                self._reassert_all()

    def _reassert_all(self) -> None:
        """Mark every key this instance holds for re-assertion (a new connection was made)."""
        for h in self._held.values():
            h.dirty = True
        if self._held:
            self._wake.set()

    async def _script(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[str | int],
        timeout: float | None = None,
    ) -> Any:
        text, sha = SCRIPTS[name]
        client = self._client

        def call() -> Any:
            try:
                return client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # a server that has not seen it (restarted, promoted, new)
                client.script_load(text)
                return client.evalsha(sha, len(keys), *keys, *args)

        return await self._run(call, timeout)

    # -- slot bookkeeping --------------------------------------------------------------------

    async def _begin(self, keys: Sequence[str], *, acquire: bool) -> list[_Held] | None:
        """Count a script on ``keys`` as in flight, after any re-assertion of them.

        A key marked for repair is re-asserted before a script counts on it (here, once the
        writes in flight on it have ended), so a key that is never idle under load cannot put
        its repair off for ever, and no slot is granted against a count this instance knows
        may be wrong. If that re-assertion fails: an acquire gets what Redis raised (and is
        refused); a release gets None, is applied locally only, and the re-assertion that
        follows writes the lower count."""
        while True:
            busy = [
                h.reconciling
                for k in keys
                if (h := self._held.get(k)) is not None and h.reconciling is not None
            ]
            if busy:
                await busy[0].wait()
                continue
            dirty = [(k, h) for k in keys if (h := self._held.get(k)) is not None and h.dirty]
            if not dirty:
                break
            key, h = dirty[0]
            if h.in_flight > 0:
                if h.idle is None:
                    h.idle = trio.Event()
                await h.idle.wait()
                continue
            try:
                await self._reconcile(key, h)
            except UNAVAILABLE:
                if acquire:
                    raise
                return None
        held = [self._held.setdefault(k, _Held()) for k in keys]
        for h in held:
            h.in_flight += 1
        return held

    def _end(self, keys: Sequence[str], held: list[_Held], delta: int, *, certain: bool) -> None:
        for key, h in zip(keys, held, strict=True):
            h.in_flight -= 1
            h.confirmed = max(0, h.confirmed + delta)
            if not certain:
                h.dirty = True
                self._wake.set()
            if h.in_flight == 0 and h.idle is not None:
                h.idle.set()
                h.idle = None
            self._maybe_forget(key, h)

    def _maybe_forget(self, key: str, h: _Held) -> None:
        if h.confirmed == 0 and h.in_flight == 0 and not h.dirty and h.reconciling is None:
            self._held.pop(key, None)

    async def _change(self, name: str, keys: Sequence[str], limits: Sequence[int] = ()) -> Any:
        """Run the acquire or release script; on success the local count moves with it.
        Returns None if Redis did not answer or the write was fenced (the keys are then marked
        for repair). An acquire that finds Redis lost this instance's counts on a key
        re-asserts them and tries once more."""
        for attempt in (1, 2):
            result = await self._change_once(name, keys, limits)
            if result is not _LOST:
                return result
            if attempt == 2:
                return None
        raise AssertionError("unreachable")

    async def _change_once(self, name: str, keys: Sequence[str], limits: Sequence[int]) -> Any:
        acquire = name == "acquire"
        began = False
        try:
            maybe_held = await self._begin(keys, acquire=acquire)
            began = True
        except UNAVAILABLE as exc:  # only an acquire's re-assertion raises
            log.warning(
                "state_unavailable", operation="reassert", before=name, error=_describe(exc)
            )
            return None
        finally:
            if not began and not acquire:
                # Cancelled while waiting (a bounded release): the slot is still gone.
                self._release_locally(keys)
        if maybe_held is None:  # a release on keys whose re-assertion failed
            self._release_locally(keys)
            return None
        held = maybe_held
        result: Any = None
        certain = False
        try:
            # The epoch is read after _begin: a re-assertion it waited for has an older one.
            epoch = self._epoch
            # The keys Redis must hold a live entry of this instance on.
            holds = [1 if h.confirmed > 0 else 0 for h in held]
            args: list[str | int] = (
                [self.instance_id, self._lease_ms, epoch, *limits, *holds]
                if acquire
                else [self.instance_id, epoch]
            )
            result = await self._script(name, keys, args)
            fenced = int(result[0]) == -1 if acquire else int(result) == 0
            if fenced:
                # Not applied: only a write older than a re-assertion can be; repair it.
                log.warning("state_write_fenced", operation=name)
            elif acquire and int(result[0]) == -2:
                log.warning("state_counts_lost", operation=name)
                result = _LOST
            else:
                certain = True
        except UNAVAILABLE as exc:
            log.warning("state_unavailable", operation=name, error=_describe(exc))
        finally:
            if acquire:
                granted = certain and int(result[0]) == 0
                self._end(keys, held, 1 if granted else 0, certain=certain)
            else:  # release: the slot is gone locally whatever Redis answered
                self._end(keys, held, -1, certain=certain)
        if result is _LOST:
            return _LOST
        return result if certain else None

    async def acquire_slot(self, req: SlotRequest) -> SlotLease | Refusal:
        user_keys = [
            self._layout.user(req.principal),
            self._layout.user_listener(req.principal, req.listener),
        ]
        total_key = [self._layout.total()]
        res = await self._change("acquire", user_keys, [req.max_user, req.max_user_listener])
        if res is None:
            return errors.state_unavailable("slot acquire failed")
        if int(res[0]) != 0:
            if int(res[0]) == 1:
                return errors.limit_reached(LIMIT_USER, req.max_user, f"principal={req.principal}")
            return errors.limit_reached(
                limit_listener(req.listener), req.max_user_listener, f"principal={req.principal}"
            )
        refusal: Refusal | None = None
        granted = False
        try:
            res = await self._change("acquire", total_key, [req.max_total])
            if res is None:
                refusal = errors.state_unavailable("total slot acquire failed")
            elif int(res[0]) != 0:
                refusal = errors.limit_reached(LIMIT_TOTAL, req.max_total)
            else:
                granted = True
        finally:
            if not granted:
                # Undo the user-level slot (also when cancelled).
                await self._undo(user_keys)
        if refusal is not None:
            return refusal
        lease = SlotLease(secrets.token_hex(12), req.principal, req.listener)
        self._leases[lease.lease_id] = lease
        return lease

    def _release_locally(self, keys: Sequence[str]) -> None:
        """A release Redis did not get: count it here; the re-assertion writes it."""
        for key in keys:
            h = self._held.setdefault(key, _Held())
            h.confirmed = max(0, h.confirmed - 1)
            h.dirty = True
        self._wake.set()

    async def _undo(self, keys: list[str]) -> None:
        # Shielded and bounded; every way out of a release counts it locally exactly once
        # (a release that did not reach Redis marks the keys for repair).
        with trio.CancelScope(shield=True), trio.move_on_after(self._op_timeout):
            await self._change("release", keys)

    async def release_slot(self, lease: SlotLease) -> None:
        if self._leases.pop(lease.lease_id, None) is None:
            return  # already released (idempotent)
        groups = (
            [
                self._layout.user(lease.principal),
                self._layout.user_listener(lease.principal, lease.listener),
            ],
            [self._layout.total()],
        )
        # Shielded and bounded: a session ending by cancellation still gives its slot back.
        with trio.CancelScope(shield=True):
            for keys in groups:
                with trio.move_on_after(2 * self._op_timeout):
                    await self._change("release", keys)

    async def slot_usage(self, principal: str, listener: str) -> SlotUsage:
        try:
            user = await self._script(
                "count",
                [self._layout.user(principal), self._layout.user_listener(principal, listener)],
                [],
            )
            total = await self._script("count", [self._layout.total()], [])
        except UNAVAILABLE as exc:
            raise StateUnavailableError(
                f"shared state (Redis) unavailable: {_describe(exc)}"
            ) from exc
        return SlotUsage(int(user[0]), int(user[1]), int(total[0]))

    # -- maintenance -------------------------------------------------------------------------

    async def run_maintenance(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Heartbeat every lease/3 and repair dirty keys soon after they turn dirty. Returns
        once the store is closed."""
        task_status.started()
        backoff = _RETRY_MIN
        next_beat = trio.current_time()
        while not self._closed:
            if trio.current_time() >= next_beat:
                await self._heartbeat()
                next_beat = trio.current_time() + self._lease / 3
            elif self._dirty_keys():
                await self._repair(self._dirty_keys())
            wait_until = next_beat
            if self._dirty_keys():
                wait_until = min(wait_until, trio.current_time() + backoff)
                backoff = min(backoff * 2, self._lease / 3)
            else:
                backoff = _RETRY_MIN
            self._wake = trio.Event()
            with trio.move_on_at(wait_until):
                await self._wake.wait()

    def _dirty_keys(self) -> list[str]:
        return [k for k, h in self._held.items() if h.dirty]

    async def _heartbeat(self) -> None:
        async with self._instance_lock:
            if self._closed:  # the close deletes the key: never write it again
                return
            try:
                await self._run(
                    functools.partial(
                        self._client.set,
                        self._layout.instance(self.instance_id),
                        "1",
                        px=self._lease_ms,
                    ),
                    abandon=False,
                )
            except UNAVAILABLE as exc:
                log.warning("state_unavailable", operation="heartbeat", error=_describe(exc))
                return
        await self._repair(list(self._held))

    async def _repair(self, keys: list[str]) -> None:
        """Re-assert this instance's count on each key; stop at the first failure, and once
        the store is closed (the close gives the counts back; a re-assertion begun before
        carries an older epoch and is fenced)."""
        for key in keys:
            if self._closed:
                return
            h = self._held.get(key)
            if h is None:
                continue
            try:
                if h.in_flight > 0 or h.reconciling is not None:
                    if not h.dirty:
                        await self._script("refresh", [key], [self.instance_id, self._lease_ms])
                    continue
                await self._reconcile(key, h)
            except UNAVAILABLE as exc:
                log.warning("state_unavailable", operation="repair", error=_describe(exc))
                return

    async def _reconcile(self, key: str, h: _Held) -> None:
        done = trio.Event()
        h.reconciling = done
        ok = False
        self._epoch += 1
        try:
            args: list[str | int] = [self.instance_id, h.confirmed, self._lease_ms, self._epoch]
            ok = int(await self._script("reconcile", [key], args)) == 1
            if not ok:
                log.warning("state_write_fenced", operation="reconcile")
        finally:
            h.reconciling = None
            done.set()
            if ok:
                h.dirty = False
            self._maybe_forget(key, h)

    # -- cancel keys -------------------------------------------------------------------------

    async def register_cancel_key(
        self, pid: int, secret: bytes, target: CancelTarget, ttl: float
    ) -> None:
        validate_cancel_args(pid, secret)
        self._cancel.register(pid, secret, target, ttl)
        key = self._layout.cancel(pid, secret)
        try:
            await self._run(
                functools.partial(
                    self._client.set, key, target.encode(), px=max(1, int(ttl * 1000))
                )
            )
        except UNAVAILABLE as exc:
            log.warning(
                "state_unavailable",
                operation="register_cancel_key",
                error=_describe(exc),
                effect="cancel key kept on this instance only",
            )

    async def unregister_cancel_key(self, pid: int, secret: bytes) -> None:
        self._cancel.unregister(pid, secret)
        try:
            await self._run(
                functools.partial(self._client.delete, self._layout.cancel(pid, secret))
            )
        except UNAVAILABLE as exc:
            log.warning(
                "state_unavailable", operation="unregister_cancel_key", error=_describe(exc)
            )

    async def lookup_cancel_key(self, pid: int, secret: bytes) -> CancelTarget | None:
        """The target registered for the key, here or by another instance. What comes from
        Redis is anyone-who-can-write-Redis's claim: the cancel path checks it against this
        instance's configuration before it connects anywhere."""
        local = self._cancel.lookup(pid, secret)
        if local is not None:
            return local
        if not 4 <= len(secret) <= 256 or not -(2**31) <= pid <= 0xFFFFFFFF:
            return None
        try:
            # At most MAX_CANCEL_VALUE bytes: a value someone wrote there could be huge.
            raw = await self._run(
                functools.partial(
                    self._client.getrange,
                    self._layout.cancel(pid, secret),
                    0,
                    MAX_CANCEL_VALUE - 1,
                )
            )
        except UNAVAILABLE as exc:
            log.warning(
                "state_unavailable",
                operation="lookup_cancel_key",
                error=_describe(exc),
                effect="cancel request dropped",
            )
            return None
        if not raw:  # no such key
            return None
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        target = None if len(raw) >= MAX_CANCEL_VALUE else CancelTarget.decode(text)
        if target is None:
            log.warning("cancel_key_malformed", pid=pid, length=len(raw))
        return target

    # -- locks -------------------------------------------------------------------------------

    async def acquire_lock(self, name: str, *, ttl: float, deadline: float) -> LockToken | None:
        if ttl <= 0:
            raise ValueError("lock ttl must be positive")
        key = self._layout.lock(name)
        token = secrets.token_hex(16)
        args: list[str | int] = [token, max(1, int(ttl * 1000))]
        delay = _LOCK_POLL_MIN
        unanswered = False  # a try that may have taken the lock without our knowing
        while True:
            remaining = deadline - trio.current_time()
            try:
                taken = await self._script(
                    "lock", [key], args, timeout=max(0.001, min(self._op_timeout, remaining))
                )
                if int(taken) == 1:
                    return LockToken(name, token)
            except UNAVAILABLE as exc:
                unanswered = True
                log.warning(
                    "state_unavailable", operation="acquire_lock", lock=name, error=_describe(exc)
                )
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                if unanswered:
                    # Give back what a try whose answer was lost may hold: else a token no
                    # caller has would keep everyone out until the ttl.
                    await self.release_lock(LockToken(name, token))
                return None
            await trio.sleep(min(delay, remaining))
            delay = min(delay * 2, _LOCK_POLL_MAX)

    async def release_lock(self, token: LockToken) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self._script("unlock", [self._layout.lock(token.name)], [token.token])
        except UNAVAILABLE as exc:
            log.warning(
                "state_unavailable",
                operation="release_lock",
                lock=token.name,
                error=_describe(exc),
                effect="the lock expires by its ttl",
            )

    async def warm_up(self) -> None:
        """Connect once, bounded by a few call timeouts, so that the first session does not
        pay for it (a cluster client reads the slot table and the server's command table
        when it is made, which takes a while on a busy machine). Failure is logged only:
        the calls that follow fail closed and try again."""
        try:
            await self._run(self._client.ping, timeout=3 * self._op_timeout)
        except UNAVAILABLE as exc:
            log.warning("state_unavailable", operation="warm_up", error=_describe(exc))

    async def ping(self) -> None:
        """One PING, bounded by the operation timeout (the readiness check). Raises
        :class:`StateUnavailableError` when Redis does not answer."""
        try:
            await self._run(self._client.ping)
        except UNAVAILABLE as exc:
            raise StateUnavailableError(f"Redis did not answer: {_describe(exc)}") from None

    # -- shutdown ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Give back this instance's remaining slots and heartbeat, then close the pool.
        Shielded, bounded by a few operation timeouts. The instance key is deleted after any
        heartbeat in flight has landed, and no heartbeat writes it afterwards."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(3 * self._op_timeout):
            try:
                for key, h in list(self._held.items()):
                    h.confirmed = 0
                    await self._reconcile(key, h)
                async with self._instance_lock:
                    await self._run(
                        functools.partial(
                            self._client.delete, self._layout.instance(self.instance_id)
                        )
                    )
            except UNAVAILABLE as exc:
                log.warning(
                    "state_unavailable",
                    operation="close",
                    error=_describe(exc),
                    effect="this instance's slots expire by their lease",
                )
        with trio.CancelScope(shield=True), trio.move_on_after(self._op_timeout):
            await trio.to_thread.run_sync(self._client.close, abandon_on_cancel=True)


def _describe(exc: BaseException) -> str:
    """Exception text safe for logs (redis-py messages carry host:port, never the password)."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
