"""Waypoint's cross-instance locks: the role lock and the group locks.

Every one of them is a session-level advisory lock on a dedicated admin
connection to ``admin_database``, a database no grant reaches: advisory locks
are per database, so no caller's session can take or block them, although the
keys are computable from public values (and ``pg_locks`` shows them).

The role lock (lock order step 2): ``pg_try_advisory_lock(1, h(role))``,
retried from trio every 20-50 ms (with jitter) until the deadline. A worker thread blocked in
``pg_advisory_lock`` could not be cancelled, hence the try-loop. Session locks
are re-entrant, so a lock connection is checked out by exactly one lease at a
time and never shared between roles; when a holder cannot release cleanly the
connection is closed, which releases the lock server-side.

:class:`RoleLockBackend` is the protocol; the Provisioner accepts another implementation
(``lock_backend``), but none ships: CockroachDB, which has no advisory locks, is refused.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

import trio
from attrs import field, frozen
from pg8000.exceptions import DatabaseError

from waypoint.provision.admin import (
    CONNECTION_ERRORS,
    AdminConnectionLost,
    AdminPools,
    AdminSession,
    wrap_error,
)
from waypoint.provision.sql import (
    GROUP_LOCK_CLASS,
    ROLE_LOCK_CLASS,
    group_lock_keys,
    role_lock_key,
)

RETRY_MIN: Final = 0.020
RETRY_MAX: Final = 0.050
RELEASE_TIMEOUT: Final = 2.0
MAX_IDLE_LOCK_SESSIONS: Final = 8


class RoleLockTimeout(Exception):
    """The role lock was not obtained before the deadline (another holder kept it)."""


@frozen
class RoleLease:
    """Proof of holding the role lock for ``role``; ``token`` is backend-private."""

    role: str
    token: Any = field(eq=False, repr=False)


class RoleLockBackend(Protocol):
    async def acquire(self, role: str, deadline: float) -> RoleLease:
        """Hold the lock for ``role``; ``deadline`` is in ``trio.current_time()`` terms.

        Raises :class:`RoleLockTimeout` at the deadline.
        """
        ...

    async def try_acquire(self, role: str) -> RoleLease | None:
        """One attempt, no waiting: the lease, or ``None`` when the role is busy."""
        ...

    async def release(self, lease: RoleLease) -> None:
        """Release (safe to call during cancellation; bounded)."""
        ...

    async def aclose(self) -> None: ...


class _LockSessions:
    """Dedicated sessions to ``admin_database`` for session-level advisory locks.

    A session is checked out by exactly one holder at a time (session locks are re-entrant,
    so sharing one would merge two holders' locks); up to ``max_idle`` unlocked sessions are
    kept for reuse. A session whose locks cannot be released cleanly is closed, which
    releases them server-side.
    """

    def __init__(self, pools: AdminPools, max_idle: int) -> None:
        self.pools = pools
        self._idle: list[AdminSession] = []
        self._max_idle = max_idle

    async def checkout(self) -> AdminSession:
        while self._idle:
            sess = self._idle.pop()
            if not sess.broken:
                sess.reused = True
                return sess
        return await self.pools.connect(self.pools.admin_database)

    async def checkin(self, sess: AdminSession) -> None:
        if sess.broken or len(self._idle) >= self._max_idle:
            await self.close(sess)
        else:
            self._idle.append(sess)

    async def close(self, sess: AdminSession) -> None:
        with trio.move_on_after(RELEASE_TIMEOUT) as scope:
            scope.shield = True
            await trio.to_thread.run_sync(sess.close, limiter=self.pools.limiter)
        if scope.cancelled_caught:
            sess.broken = True

    @staticmethod
    def _try_lock(sess: AdminSession, cls: int, key: int) -> bool:
        try:
            rows = sess.run(f"SELECT pg_catalog.pg_try_advisory_lock({int(cls)}, :k)", k=key)
        except DatabaseError as exc:
            raise wrap_error(exc, "advisory lock failed") from None
        except CONNECTION_ERRORS as exc:
            raise AdminConnectionLost(
                f"lock connection lost: {type(exc).__name__}: {exc}"
            ) from None
        return bool(rows[0][0])

    async def try_lock(
        self, sess: AdminSession, cls: int, key: int, *, holds_locks: bool
    ) -> tuple[AdminSession, bool]:
        """One try on ``sess``. A reused session that died while idle is replaced once by a
        fresh one, unless it ``holds_locks`` already (then losing it lost them: an error)."""
        try:
            return sess, await self.pools.call(sess, lambda s: self._try_lock(s, cls, key))
        except AdminConnectionLost:
            if not sess.reused or holds_locks:
                raise
        await self.close(sess)
        sess = await self.pools.connect(self.pools.admin_database)
        try:
            return sess, await self.pools.call(sess, lambda s: self._try_lock(s, cls, key))
        except BaseException:
            await self.close(sess)
            raise

    async def unlock(self, sess: AdminSession, cls: int, keys: Sequence[int]) -> None:
        """Release ``keys`` (shielded, bounded); the session goes back to the idle list only
        when every unlock reported success, otherwise it is closed."""

        def run(s: AdminSession) -> bool:
            done = True
            for key in reversed(keys):
                rows = s.run(f"SELECT pg_catalog.pg_advisory_unlock({int(cls)}, :k)", k=key)
                done = done and bool(rows and rows[0][0])
            return done

        ok = False
        with trio.move_on_after(RELEASE_TIMEOUT) as scope:
            scope.shield = True
            try:
                ok = await self.pools.call(sess, run)
            except Exception:
                ok = False
        if ok and not scope.cancelled_caught:
            await self.checkin(sess)
        else:
            await self.close(sess)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for sess in idle:
            await self.close(sess)


class PgAdvisoryRoleLock:
    """The default backend: session-level advisory locks in ``admin_database``."""

    def __init__(self, pools: AdminPools, *, max_idle: int = MAX_IDLE_LOCK_SESSIONS) -> None:
        self._sessions = _LockSessions(pools, max_idle)
        self._rng = random.Random()

    @property
    def sessions(self) -> _LockSessions:
        return self._sessions

    async def try_acquire(self, role: str) -> RoleLease | None:
        sess = await self._sessions.checkout()
        key = role_lock_key(role)
        try:
            sess, got = await self._sessions.try_lock(sess, ROLE_LOCK_CLASS, key, holds_locks=False)
        except BaseException:
            await self._sessions.close(sess)
            raise
        if got:
            return RoleLease(role, sess)
        await self._sessions.checkin(sess)
        return None

    async def acquire(self, role: str, deadline: float) -> RoleLease:
        sess = await self._sessions.checkout()
        key = role_lock_key(role)
        try:
            while True:
                sess, got = await self._sessions.try_lock(
                    sess, ROLE_LOCK_CLASS, key, holds_locks=False
                )
                if got:
                    return RoleLease(role, sess)
                now = trio.current_time()
                if now >= deadline:
                    raise RoleLockTimeout(f"role lock for {role!r} still busy at the deadline")
                await trio.sleep(min(deadline - now, self._rng.uniform(RETRY_MIN, RETRY_MAX)))
        except RoleLockTimeout:
            await self._sessions.checkin(sess)
            raise
        except BaseException:
            # Cancelled or failed mid-attempt: we may or may not hold the lock; closing the
            # connection releases it for certain.
            await self._sessions.close(sess)
            raise

    async def release(self, lease: RoleLease) -> None:
        sess: AdminSession = lease.token
        await self._sessions.unlock(sess, ROLE_LOCK_CLASS, [role_lock_key(lease.role)])

    async def aclose(self) -> None:
        await self._sessions.aclose()


class GroupLocks:
    """The group locks: ``(2, h(database, schema))`` for each schema a provision or a reap
    touches, session-level advisory locks on a dedicated session in ``admin_database``,
    taken in sorted key order (so two holders never wait on each other in a cycle) before
    the transaction in the target database starts and released after it ends.

    They live in ``admin_database`` rather than in the target database because advisory
    locks are per database and every caller can compute the keys: a caller's session in the
    target database can neither take nor block them. Waits are try-loops (20-50 ms with
    jitter), bounded by the caller's cancel scope.
    """

    def __init__(self, sessions: _LockSessions) -> None:
        self._sessions = sessions
        self._rng = random.Random()

    @asynccontextmanager
    async def hold(self, database: str, schemas: Iterable[str]) -> AsyncIterator[None]:
        keys = group_lock_keys(database, schemas)
        if not keys:
            yield
            return
        sess = await self._sessions.checkout()
        taken: list[int] = []
        try:
            for key in keys:
                while True:
                    sess, got = await self._sessions.try_lock(
                        sess, GROUP_LOCK_CLASS, key, holds_locks=bool(taken)
                    )
                    if got:
                        taken.append(key)
                        break
                    await trio.sleep(self._rng.uniform(RETRY_MIN, RETRY_MAX))
        except BaseException:
            await self._sessions.close(sess)
            raise
        try:
            yield
        finally:
            await self._sessions.unlock(sess, GROUP_LOCK_CLASS, taken)
