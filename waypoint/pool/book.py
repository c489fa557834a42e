"""The pool's bookkeeping, sans I/O: which idle backends are kept, for whom, until when, and
which go when a bound is reached.

A backend is kept under a :class:`PoolKey` (the role, listener, backend server, database,
protocol version and the exact startup parameters of the session that logged it in) and
handed out only for an equal key: a pooled backend never crosses to another role, listener,
server or database. The book holds the backends (any type); the caller does the I/O: it
closes what the book gives back as :class:`Closing` (ended on the server), resets a backend
before :meth:`PoolBook.keep`, and checks one after :meth:`PoolBook.take`.

Bounds (:class:`PoolLimits`, from the listener's settings):

- ``idle_timeout``: a backend not taken for this long is closed;
- ``max_lifetime``: a backend is kept no longer than this after its login;
- ``max_per_role``: idle backends per role; one more closes the role's longest-idle one;
- ``max_idle``: idle backends per backend server (all its databases and listeners); when it is
  reached, the longest-idle backend of the role that holds the most goes first (ties: the role
  whose longest-idle backend has waited longest), so one busy identity cannot crowd out the
  rest.

Time comes from an injected clock (``trio.current_time`` in the app, a fake in tests).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, Literal, TypeVar

import attrs

T = TypeVar("T")

#: Why a pooled (or would-be pooled) backend was closed: the ``reason`` label of
#: ``waypoint_pool_closes_total``.
CloseReason = Literal[
    "idle_timeout",  # not taken within pool_idle_timeout
    "max_lifetime",  # older than pool_max_lifetime
    "max_per_role",  # the role had pool_max_per_role idle backends already
    "max_idle",  # the server's pool_max_idle cap was reached
    "not_idle",  # the session did not end cleanly with its backend idle
    "reset_failed",  # the reset query failed or took too long
    "check_failed",  # closed by the server (or broken) while pooled
    "role_closed",  # the role's access changed (grant, revocation, rotation, reap)
    "listener_changed",  # a reload changed or removed the listener
    "shutdown",  # drain or shutdown
    "disabled",  # pool = false, or the cancel key could not be withdrawn
]

CLOSE_REASONS: tuple[str, ...] = CloseReason.__args__  # type: ignore[attr-defined]

#: Startup parameters that are not part of the key: the role and database are.
_NOT_IN_KEY = frozenset({"user", "database"})


@attrs.frozen
class PoolKey:
    """What a backend was logged in for. Two sessions share a backend only with equal keys."""

    role: str
    listener: str
    server: tuple[str, int]
    database: str
    protocol: tuple[int, int]
    #: Every parameter of the client's StartupMessage except ``user`` and ``database``, sorted
    #: by name; compared exactly (``_pq_.*`` protocol options included).
    parameters: tuple[tuple[str, str], ...]

    @classmethod
    def of(
        cls,
        *,
        role: str,
        listener: str,
        server: tuple[str, int],
        database: str,
        protocol: tuple[int, int],
        startup_parameters: Mapping[str, str],
    ) -> PoolKey:
        return cls(
            role, listener, server, database, protocol, cls.parameters_of(startup_parameters)
        )

    @staticmethod
    def parameters_of(startup_parameters: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        """The ``parameters`` of a key for these startup parameters."""
        return tuple(sorted((k, v) for k, v in startup_parameters.items() if k not in _NOT_IN_KEY))


def idle_cap(share: float, max_connections: int) -> int:
    """``pool_max_idle`` as a count: ``share`` of the server's ``max_connections``, rounded
    down, at least 1."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be positive, got {max_connections}")
    return max(1, math.floor(share * max_connections))


@attrs.frozen
class PoolLimits:
    idle_timeout: float
    max_lifetime: float
    max_per_role: int
    #: Idle backends per backend server, at most (:func:`idle_cap`).
    max_idle: int

    def __attrs_post_init__(self) -> None:
        if self.idle_timeout <= 0 or self.max_lifetime <= 0:
            raise ValueError("idle_timeout and max_lifetime must be positive")
        if self.max_per_role < 1 or self.max_idle < 1:
            raise ValueError("max_per_role and max_idle must be at least 1")


@attrs.define(eq=False)
class Entry(Generic[T]):
    """One idle backend in the pool."""

    key: PoolKey
    backend: T
    #: When it logged in (``max_lifetime`` counts from here).
    born: float
    #: When it was kept (``idle_timeout`` counts from here).
    idle_since: float
    idle_timeout: float
    max_lifetime: float

    @property
    def end_of_life(self) -> float:
        return self.born + self.max_lifetime

    @property
    def expires(self) -> float:
        return min(self.idle_since + self.idle_timeout, self.end_of_life)

    def expiry_reason(self, now: float) -> CloseReason | None:
        if now >= self.end_of_life:
            return "max_lifetime"
        if now >= self.idle_since + self.idle_timeout:
            return "idle_timeout"
        return None


@attrs.frozen
class Closing(Generic[T]):
    """A backend the caller must close (and end on the server), and why."""

    key: PoolKey
    backend: T
    reason: CloseReason


class PoolBook(Generic[T]):
    """Idle backends by key. Not thread-safe; one per app (all listeners), used from trio."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # key -> entries, oldest idle first (take pops the newest: the others age out)
        self._by_key: dict[PoolKey, list[Entry[T]]] = {}
        # key without its role (role "") -> how many entries (:meth:`holds_any_role`)
        self._any_role: collections.Counter[PoolKey] = collections.Counter()

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def __iter__(self) -> Iterator[Entry[T]]:
        for entries in list(self._by_key.values()):
            yield from list(entries)

    def holds_any_role(self, key: PoolKey) -> bool:
        """Whether a backend is kept for ``key`` (whose role is ignored) of any role, without
        a look at each entry."""
        return self._any_role[attrs.evolve(key, role="")] > 0

    def idle_by_listener(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self:
            counts[entry.key.listener] = counts.get(entry.key.listener, 0) + 1
        return counts

    def idle_by_role(self, listener: str) -> dict[str, int]:
        """Idle backends per role of ``listener`` (for ``waypoint roles list``)."""
        counts: dict[str, int] = {}
        for entry in self:
            if entry.key.listener == listener:
                counts[entry.key.role] = counts.get(entry.key.role, 0) + 1
        return counts

    def next_expiry(self) -> float | None:
        """When the next backend expires (idle timeout or lifetime); None when empty."""
        return min((e.expires for e in self), default=None)

    # -- changes ---------------------------------------------------------------------------
    def keep(
        self, key: PoolKey, backend: T, *, born: float, limits: PoolLimits
    ) -> list[Closing[T]]:
        """Keep ``backend`` (reset, idle) under ``key``. Returns what must be closed now: the
        backend itself if it is past its lifetime, or the ones it displaces."""
        now = self._clock()
        entry = Entry(key, backend, born, now, limits.idle_timeout, limits.max_lifetime)
        if entry.expiry_reason(now) is not None:
            return [Closing(key, backend, "max_lifetime")]
        closing = self.expire()
        self._by_key.setdefault(key, []).append(entry)
        self._any_role[attrs.evolve(key, role="")] += 1
        role = (key.server, key.role)
        while True:
            of_role = [e for e in self if (e.key.server, e.key.role) == role]
            if len(of_role) <= limits.max_per_role:
                break
            closing.append(self._evict(_longest_idle(of_role), "max_per_role"))
        while True:
            on_server = [e for e in self if e.key.server == key.server]
            if len(on_server) <= limits.max_idle:
                break
            closing.append(self._evict(_victim(on_server), "max_idle"))
        return closing

    def take(self, key: PoolKey) -> tuple[Entry[T] | None, list[Closing[T]]]:
        """The most recently kept live backend for ``key`` (removed from the pool), or None;
        and the expired backends to close (this key's or any other's)."""
        closing = self.expire()
        entries = self._by_key.get(key)
        if not entries:
            return None, closing
        entry = entries.pop()
        if not entries:
            del self._by_key[key]
        self._forget_role_of(key)
        return entry, closing

    def expire(self) -> list[Closing[T]]:
        """Remove every backend past its idle timeout or lifetime; returns them."""
        now = self._clock()
        closing: list[Closing[T]] = []
        for entry in self:
            reason = entry.expiry_reason(now)
            if reason is not None:
                closing.append(self._evict(entry, reason))
        return closing

    def close_where(self, pred: Callable[[PoolKey], bool], reason: CloseReason) -> list[Closing[T]]:
        """Remove every backend whose key ``pred`` accepts (a role's access changed, a listener
        was reconfigured, shutdown); returns them."""
        return self.close_if(lambda e: pred(e.key), reason)

    def close_if(self, pred: Callable[[Entry[T]], bool], reason: CloseReason) -> list[Closing[T]]:
        """Remove every backend ``pred`` accepts; returns them."""
        return [self._evict(e, reason) for e in self if pred(e)]

    def _evict(self, entry: Entry[T], reason: CloseReason) -> Closing[T]:
        entries = self._by_key[entry.key]
        entries.remove(entry)
        if not entries:
            del self._by_key[entry.key]
        self._forget_role_of(entry.key)
        return Closing(entry.key, entry.backend, reason)

    def _forget_role_of(self, key: PoolKey) -> None:
        unroled = attrs.evolve(key, role="")
        self._any_role[unroled] -= 1
        if self._any_role[unroled] <= 0:
            del self._any_role[unroled]


def _longest_idle(entries: list[Entry[T]]) -> Entry[T]:
    return min(entries, key=lambda e: e.idle_since)


def _victim(entries: list[Entry[T]]) -> Entry[T]:
    """The longest-idle backend of the role that holds the most of ``entries`` (ties: the role
    whose longest-idle backend has waited longest)."""
    by_role: dict[str, list[Entry[T]]] = {}
    for e in entries:
        by_role.setdefault(e.key.role, []).append(e)
    most = max(len(v) for v in by_role.values())
    oldest = [_longest_idle(v) for v in by_role.values() if len(v) == most]
    return _longest_idle(oldest)


__all__ = [
    "CLOSE_REASONS",
    "CloseReason",
    "Closing",
    "Entry",
    "PoolBook",
    "PoolKey",
    "PoolLimits",
    "idle_cap",
]
