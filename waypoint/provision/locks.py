"""The cross-instance role lock (SPEC §5 "Locking", lock order step 2).

On PostgreSQL: a session-level ``pg_try_advisory_lock(1, h(role))`` on a
dedicated admin connection to ``admin_database``, retried from trio every
20-50 ms (with jitter) until the deadline. A worker thread blocked in
``pg_advisory_lock`` could not be cancelled, hence the try-loop. Session locks
are re-entrant, so a lock connection is checked out by exactly one lease at a
time and never shared between roles; when a holder cannot release cleanly the
connection is closed, which releases the lock server-side.

:class:`RoleLockBackend` is the protocol; the state helper backs it with Redis
(``SET NX PX`` with a random token) for CockroachDB, which has no advisory locks.
"""

from __future__ import annotations

import random
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
from waypoint.provision.sql import ROLE_LOCK_CLASS, role_lock_key

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


class PgAdvisoryRoleLock:
    """The default backend: session-level advisory locks in ``admin_database``."""

    def __init__(self, pools: AdminPools, *, max_idle: int = MAX_IDLE_LOCK_SESSIONS) -> None:
        self._pools = pools
        self._idle: list[AdminSession] = []
        self._max_idle = max_idle
        self._rng = random.Random()

    async def _checkout(self) -> AdminSession:
        while self._idle:
            sess = self._idle.pop()
            if not sess.broken:
                sess.reused = True
                return sess
        return await self._pools.connect(self._pools.admin_database)

    async def _checkin(self, sess: AdminSession) -> None:
        if sess.broken or len(self._idle) >= self._max_idle:
            await self._close(sess)
        else:
            self._idle.append(sess)

    async def _close(self, sess: AdminSession) -> None:
        with trio.move_on_after(RELEASE_TIMEOUT) as scope:
            scope.shield = True
            await trio.to_thread.run_sync(sess.close, limiter=self._pools.limiter)
        if scope.cancelled_caught:
            sess.broken = True

    @staticmethod
    def _try_lock(sess: AdminSession, key: int) -> bool:
        try:
            rows = sess.run(f"SELECT pg_catalog.pg_try_advisory_lock({ROLE_LOCK_CLASS}, :k)", k=key)
        except DatabaseError as exc:
            raise wrap_error(exc, "role lock failed") from None
        except CONNECTION_ERRORS as exc:
            raise AdminConnectionLost(
                f"role lock connection lost: {type(exc).__name__}: {exc}"
            ) from None
        return bool(rows[0][0])

    async def _try_lock_on(self, sess: AdminSession, key: int) -> tuple[AdminSession, bool]:
        """One try; a session that died while idle is replaced once by a fresh one."""
        try:
            return sess, await self._pools.call(sess, lambda s: self._try_lock(s, key))
        except AdminConnectionLost:
            if not sess.reused:
                raise
        await self._close(sess)
        sess = await self._pools.connect(self._pools.admin_database)
        try:
            return sess, await self._pools.call(sess, lambda s: self._try_lock(s, key))
        except BaseException:
            await self._close(sess)
            raise

    async def try_acquire(self, role: str) -> RoleLease | None:
        sess = await self._checkout()
        key = role_lock_key(role)
        try:
            sess, got = await self._try_lock_on(sess, key)
        except BaseException:
            await self._close(sess)
            raise
        if got:
            return RoleLease(role, sess)
        await self._checkin(sess)
        return None

    async def acquire(self, role: str, deadline: float) -> RoleLease:
        sess = await self._checkout()
        key = role_lock_key(role)
        try:
            while True:
                sess, got = await self._try_lock_on(sess, key)
                if got:
                    return RoleLease(role, sess)
                now = trio.current_time()
                if now >= deadline:
                    raise RoleLockTimeout(f"role lock for {role!r} still busy at the deadline")
                await trio.sleep(min(deadline - now, self._rng.uniform(RETRY_MIN, RETRY_MAX)))
        except RoleLockTimeout:
            await self._checkin(sess)
            raise
        except BaseException:
            # Cancelled or failed mid-attempt: we may or may not hold the lock; closing the
            # connection releases it for certain.
            await self._close(sess)
            raise

    async def release(self, lease: RoleLease) -> None:
        sess: AdminSession = lease.token
        key = role_lock_key(lease.role)
        ok = False
        with trio.move_on_after(RELEASE_TIMEOUT) as scope:
            scope.shield = True
            try:
                rows = await self._pools.call(
                    sess,
                    lambda s: s.run(
                        f"SELECT pg_catalog.pg_advisory_unlock({ROLE_LOCK_CLASS}, :k)", k=key
                    ),
                )
                ok = bool(rows and rows[0][0])
            except Exception:
                ok = False
        if ok and not scope.cancelled_caught:
            await self._checkin(sess)
        else:
            await self._close(sess)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for sess in idle:
            await self._close(sess)
