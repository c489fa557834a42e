"""The app's pool of idle backends (one for every listener): the book (:mod:`waypoint.pool.book`)
with the I/O around it: backends it gives up are closed in the background (each ended on the
server by the function it was kept with), expired ones on time, and all of them at shutdown.

The session side (``proxy.source``) resets a backend before :meth:`BackendPool.keep` and checks
one after :meth:`BackendPool.take`; the pool itself never talks to a backend.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Final

import attrs
import trio

from waypoint.observability.log import get_logger
from waypoint.observability.metrics import Metrics
from waypoint.pool.book import CloseReason, Closing, PoolBook, PoolKey, PoolLimits

log = get_logger("pool")

#: Bound on closing one pooled backend (its end function has its own, this is the backstop).
CLOSE_BOUND: Final = 30.0


@attrs.define(eq=False)
class Pooled:
    """A backend in the pool: the logged-in connection (the source's own type), its process
    id (for the orphan sweep: this instance owns it), and how to end it on the server."""

    backend: object
    pid: int | None
    end: Callable[[], Awaitable[object]]
    #: When the role's secret stops being valid (``VALID UNTIL``, on the pool's clock): the
    #: reaper may drop the role after it, so the backend is closed by then.
    role_valid_until: float = math.inf


class BackendPool:
    """Idle backends of every listener, bounded and timed (see :mod:`waypoint.pool.book`).

    ``run`` (in the app's root nursery) closes expired backends on time and everything the
    book gives up; :meth:`close_all` at shutdown. Until ``run`` started, or once closed, the
    pool keeps nothing."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = trio.current_time) -> None:
        self.metrics = metrics
        self._clock = clock
        self.book: PoolBook[Pooled] = PoolBook(clock)
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        #: When the background task wakes next by itself (``inf`` until it first sleeps).
        self._wakes_at = math.inf
        self._closing = 0
        self._idle_closes = trio.Event()
        self.open = False
        self._listeners: set[str] = set()

    # -- the background task -----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.open = True
            task_status.started()
            try:
                while True:
                    self._close(self.book.expire())
                    self._expire_roles()
                    self._gauge()
                    deadline = min(self._next_deadline(), self._clock() + 60.0)
                    self._wakes_at = deadline
                    with trio.move_on_at(deadline):
                        await self._changed.wait()
                    self._changed = trio.Event()
            finally:
                self.open = False
                with trio.CancelScope(shield=True):
                    await self._close_now(self.book.close_where(_all, "shutdown"))

    def _next_deadline(self) -> float:
        expiry = self.book.next_expiry()
        valid = min((e.backend.role_valid_until for e in self.book), default=math.inf)
        return min(expiry if expiry is not None else math.inf, valid)

    def _expire_roles(self) -> None:
        now = self._clock()
        self._close(self.book.close_if(lambda e: e.backend.role_valid_until <= now, "role_closed"))

    # -- keeping and taking ------------------------------------------------------------------
    def keep(self, key: PoolKey, item: Pooled, *, born: float, limits: PoolLimits) -> bool:
        """Keep ``item`` (reset, idle) for the next session with ``key``; False (and nothing
        kept: the caller ends it) when the pool is not open."""
        if not self.open:
            return False
        self._listeners.add(key.listener)
        closing = self.book.keep(key, item, born=born, limits=limits)
        kept = all(c.backend is not item for c in closing)
        self._close([c for c in closing if c.backend is not item])
        if not kept:
            self.metrics.pool_closed(key.listener, "max_lifetime")
        elif (
            min(self._clock() + limits.idle_timeout, born + limits.max_lifetime)
            < self._wakes_at
            or item.role_valid_until < self._wakes_at
        ):
            # The background task sleeps until the earliest expiry it knew of; only a backend
            # that expires sooner needs it awake now (a reconnecting client's backend, kept
            # many times a second, usually does not).
            self._changed.set()
        self._gauge()
        return kept

    def take(self, key: PoolKey) -> Pooled | None:
        """A pooled backend for ``key`` (the caller checks it, and ends it if the check fails),
        or None. Counted as a hit or a miss by the caller."""
        entry, closing = self.book.take(key)
        self._close(closing)
        if entry is not None and entry.backend.role_valid_until <= self._clock():
            self._close([Closing(entry.key, entry.backend, "role_closed")])
            entry = None
        self._gauge()
        return None if entry is None else entry.backend

    # -- closing -----------------------------------------------------------------------------
    def close_where(self, pred: Callable[[PoolKey], bool], reason: CloseReason) -> int:
        """Close every pooled backend whose key ``pred`` accepts (in the background); returns
        how many."""
        closing = self.book.close_where(pred, reason)
        self._close(closing)
        self._gauge()
        return len(closing)

    def close_role(self, server: tuple[str, int], role: str, reason: CloseReason) -> int:
        return self.close_where(lambda k: k.server == server and k.role == role, reason)

    async def close_roles_now(
        self, server: tuple[str, int], roles: Collection[str], reason: CloseReason
    ) -> int:
        """Close the pooled backends of ``roles`` on ``server`` and wait until each is ended
        (bounded); returns how many."""
        wanted = frozenset(roles)
        closing = self.book.close_where(lambda k: k.server == server and k.role in wanted, reason)
        await self._close_now(closing)
        return len(closing)

    async def close_all(self, reason: CloseReason = "shutdown") -> None:
        """Close every pooled backend and wait until each is ended (bounded); keep nothing
        from now on."""
        self.open = False
        await self._close_now(self.book.close_where(_all, reason))
        with trio.move_on_after(CLOSE_BOUND):
            while self._closing:
                await self._idle_closes.wait()

    def _close(self, closing: Iterable[Closing[Pooled]]) -> None:
        for c in closing:
            if self._nursery is not None and self.open:
                self._closing += 1
                self._nursery.start_soon(self._close_one, c)
            else:  # no background task: the backend is dropped; its socket closes with it
                self.metrics.pool_closed(c.key.listener, c.reason)

    async def _close_now(self, closing: list[Closing[Pooled]]) -> None:
        if not closing:
            return
        async with trio.open_nursery() as nursery:
            for c in closing:
                self._closing += 1
                nursery.start_soon(self._close_one, c)
        self._gauge()

    async def _close_one(self, c: Closing[Pooled]) -> None:
        try:
            with trio.move_on_after(CLOSE_BOUND):
                await c.backend.end()
        except Exception as exc:
            log.warning("pooled_backend_end_failed", listener=c.key.listener, error=str(exc))
        finally:
            self.metrics.pool_closed(c.key.listener, c.reason)
            self._closing -= 1
            if not self._closing:
                self._idle_closes.set()
                self._idle_closes = trio.Event()

    # -- reading -----------------------------------------------------------------------------
    def pids(self, listener: str) -> set[int]:
        """Process ids of ``listener``'s pooled backends (this instance owns them)."""
        return {
            e.backend.pid
            for e in self.book
            if e.key.listener == listener and e.backend.pid is not None
        }

    def idle_by_role(self, listener: str) -> dict[str, int]:
        return self.book.idle_by_role(listener)

    def _gauge(self) -> None:
        self.metrics.pool_idle_now(self._listeners, self.book.idle_by_listener())


def _all(_key: PoolKey) -> bool:
    return True


__all__ = ["CLOSE_BOUND", "BackendPool", "Pooled"]
