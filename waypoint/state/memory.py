"""Single-process state: exact counters, no await between a check and its increment."""

from __future__ import annotations

import secrets
from typing import TypeVar

import trio
from attrs import define, field

from waypoint import errors
from waypoint.errors import Refusal
from waypoint.state.base import (
    LIMIT_TOTAL,
    LIMIT_USER,
    CancelTable,
    CancelTarget,
    LockToken,
    SlotLease,
    SlotRequest,
    SlotUsage,
    limit_listener,
    validate_cancel_args,
)

K = TypeVar("K")

_LOCK_POLL_MIN = 0.005
_LOCK_POLL_MAX = 0.1


@define(eq=False)  # a store is a thing, compared by identity
class MemoryStateStore:
    """State for one Waypoint process. All methods run on the trio thread; the slot
    check-and-increment contains no checkpoint, so concurrent sessions cannot both pass."""

    _user: dict[str, int] = field(factory=dict)
    _user_listener: dict[tuple[str, str], int] = field(factory=dict)
    _total: int = 0
    _leases: dict[str, SlotLease] = field(factory=dict)
    _cancel: CancelTable = field(factory=CancelTable)
    _locks: dict[str, tuple[str, float]] = field(factory=dict)
    _closed: bool = False

    async def acquire_slot(self, req: SlotRequest) -> SlotLease | Refusal:
        await trio.lowlevel.checkpoint()
        # From here to the return: no await, so the check and the increment are one step.
        user = self._user.get(req.principal, 0)
        per_listener = self._user_listener.get((req.principal, req.listener), 0)
        if req.max_user > 0 and user >= req.max_user:
            return errors.limit_reached(LIMIT_USER, req.max_user, f"principal={req.principal}")
        if req.max_user_listener > 0 and per_listener >= req.max_user_listener:
            return errors.limit_reached(
                limit_listener(req.listener), req.max_user_listener, f"principal={req.principal}"
            )
        if req.max_total > 0 and self._total >= req.max_total:
            return errors.limit_reached(LIMIT_TOTAL, req.max_total)
        self._user[req.principal] = user + 1
        self._user_listener[(req.principal, req.listener)] = per_listener + 1
        self._total += 1
        lease = SlotLease(secrets.token_hex(12), req.principal, req.listener)
        self._leases[lease.lease_id] = lease
        return lease

    async def release_slot(self, lease: SlotLease) -> None:
        if self._leases.pop(lease.lease_id, None) is None:
            return  # already released (idempotent)
        _decrement(self._user, lease.principal)
        _decrement(self._user_listener, (lease.principal, lease.listener))
        self._total -= 1

    async def slot_usage(self, principal: str, listener: str) -> SlotUsage:
        return SlotUsage(
            self._user.get(principal, 0),
            self._user_listener.get((principal, listener), 0),
            self._total,
        )

    async def register_cancel_key(
        self, pid: int, secret: bytes, target: CancelTarget, ttl: float
    ) -> None:
        validate_cancel_args(pid, secret)
        self._cancel.register(pid, secret, target, ttl)

    async def unregister_cancel_key(self, pid: int, secret: bytes) -> None:
        self._cancel.unregister(pid, secret)

    async def lookup_cancel_key(self, pid: int, secret: bytes) -> CancelTarget | None:
        await trio.lowlevel.checkpoint()
        return self._cancel.lookup(pid, secret)

    async def acquire_lock(self, name: str, *, ttl: float, deadline: float) -> LockToken | None:
        if ttl <= 0:
            raise ValueError("lock ttl must be positive")
        token = secrets.token_hex(16)
        delay = _LOCK_POLL_MIN
        while True:
            now = trio.current_time()
            held = self._locks.get(name)
            if held is None or held[1] <= now:
                self._locks[name] = (token, now + ttl)
                return LockToken(name, token)
            if now >= deadline:
                return None
            await trio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _LOCK_POLL_MAX)

    async def release_lock(self, token: LockToken) -> None:
        held = self._locks.get(token.name)
        if held is not None and secrets.compare_digest(held[0], token.token):
            del self._locks[token.name]

    async def aclose(self) -> None:
        self._closed = True


def _decrement(counts: dict[K, int], key: K) -> None:
    value = counts.get(key, 0) - 1
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)
