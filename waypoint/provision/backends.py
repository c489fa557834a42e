"""Admin statements on the backends of Waypoint's roles: terminate one session's backend,
every backend of a role, or cancel a role's running statements.

``pg_stat_activity`` shows every backend's pid and user name to any role; the admin may
signal the backends of the roles it provisions (it is a member of each). Pure SQL through
:class:`~waypoint.provision.admin.AdminPools`; the session end, revalidation and the
reaper's orphan sweep use them.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Final

import trio
from pg8000.native import identifier

from waypoint.provision.admin import AdminError, AdminPools, AdminSession

#: How often ``pg_stat_activity`` is read while waiting for a terminated backend to go.
POLL_INTERVAL: Final = 0.05

_TERMINATE_PID: Final = (
    "SELECT pg_catalog.pg_terminate_backend(s.pid) FROM ("
    "SELECT a.pid FROM pg_catalog.pg_stat_activity AS a "
    "WHERE a.pid = :pid AND a.usename = :role OFFSET 0) AS s"
)
_PID_PRESENT: Final = (
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity AS a "
    "WHERE a.pid = :pid AND a.usename = :role"
)
# OFFSET 0 keeps the filter in the subquery: the signal goes only to the rows it selects.
_SIGNAL_ROLE: Final = (
    "SELECT s.pid, pg_catalog.{fn}(s.pid) FROM ("
    "SELECT a.pid FROM pg_catalog.pg_stat_activity AS a "
    "WHERE a.usename = :role AND a.pid <> pg_catalog.pg_backend_pid() "
    "AND NOT (a.pid = ANY(CAST(:keep AS pg_catalog.int4[]))){extra} OFFSET 0) AS s"
)
_TERMINATE_ROLE: Final = _SIGNAL_ROLE.format(fn="pg_terminate_backend", extra="")
_CANCEL_ROLE: Final = _SIGNAL_ROLE.format(fn="pg_cancel_backend", extra=" AND a.state = 'active'")


# Backends of the role in a transaction that began before ``:before`` (the server's clock).
_OLD_TRANSACTIONS: Final = (
    "FROM pg_catalog.pg_stat_activity AS a WHERE a.usename = :role "
    "AND a.pid <> pg_catalog.pg_backend_pid() "
    "AND a.xact_start < CAST(:before AS pg_catalog.timestamptz)"
)
_OLD_ACTIVE: Final = f"SELECT pg_catalog.count(*) {_OLD_TRANSACTIONS} AND a.state = 'active'"
_TERMINATE_OLD: Final = (
    "SELECT s.pid, pg_catalog.pg_terminate_backend(s.pid) FROM ("
    f"SELECT a.pid {_OLD_TRANSACTIONS} OFFSET 0) AS s"
)
_SERVER_NOW: Final = "SELECT pg_catalog.clock_timestamp()"
# Transactions of the role prepared (PREPARE TRANSACTION) before ``:before``, and where.
_PREPARED: Final = (
    "SELECT p.gid, p.database::pg_catalog.text FROM pg_catalog.pg_prepared_xacts AS p "
    "WHERE p.owner = :role AND p.prepared < CAST(:before AS pg_catalog.timestamptz) "
    "ORDER BY p.prepared"
)

_TERMINATE_PIDS: Final = (
    "SELECT s.pid, pg_catalog.pg_terminate_backend(s.pid) FROM ("
    "SELECT a.pid FROM pg_catalog.pg_stat_activity AS a "
    "WHERE a.usename = :role AND a.pid = ANY(CAST(:pids AS pg_catalog.int4[])) OFFSET 0) AS s"
)


async def terminate_pid(pools: AdminPools, pid: int, role: str, wait: float) -> bool:
    """``pg_terminate_backend(pid)`` if ``pid`` is still a backend of ``role``; then wait up to
    ``wait`` seconds for it to leave ``pg_stat_activity``. Returns whether it is gone."""
    database = pools.admin_database

    def kill(sess: AdminSession) -> int:
        sess.run(_TERMINATE_PID, pid=pid, role=role)
        return int(sess.run(_PID_PRESENT, pid=pid, role=role)[0][0])

    def present(sess: AdminSession) -> int:
        return int(sess.run(_PID_PRESENT, pid=pid, role=role)[0][0])

    left = await pools.run(database, kill)
    with trio.move_on_after(wait):
        while left:
            await trio.sleep(POLL_INTERVAL)
            left = await pools.run(database, present)
    return left == 0


async def _signal_role(pools: AdminPools, sql: str, role: str, keep: Collection[int]) -> list[int]:
    def run(sess: AdminSession) -> list[int]:
        rows = sess.run(sql, role=role, keep=sorted(int(p) for p in keep))
        return [int(r[0]) for r in rows if r[1]]

    return await pools.run(pools.admin_database, run)


async def terminate_role_backends(
    pools: AdminPools, role: str, keep: Collection[int] = ()
) -> list[int]:
    """Terminate every backend of ``role`` (on any instance, or a direct login) except the
    pids in ``keep`` (sessions of this instance, which end through their own path).
    Returns the pids signalled."""
    return await _signal_role(pools, _TERMINATE_ROLE, role, keep)


async def cancel_role_statements(
    pools: AdminPools, role: str, keep: Collection[int] = ()
) -> list[int]:
    """Cancel the running statement of every active backend of ``role`` (a statement that
    started under privileges the role no longer has). Returns the pids signalled."""
    return await _signal_role(pools, _CANCEL_ROLE, role, keep)


async def server_now(pools: AdminPools) -> datetime:
    """The backend server's clock (what ``pg_stat_activity.xact_start`` is read against)."""

    def run(sess: AdminSession) -> datetime:
        value = sess.run(_SERVER_NOW)[0][0]
        if not isinstance(value, datetime):
            raise TypeError(f"clock_timestamp() gave {type(value).__name__}")
        return value

    return await pools.run(pools.admin_database, run)


async def end_transactions_begun_before(
    pools: AdminPools, role: str, before: datetime, wait: float
) -> list[int]:
    """Terminate every backend of ``role`` still in a transaction that began before
    ``before`` (the server's clock, taken once the role's privileges changed). Such a
    transaction may hold rows written, or a cursor opened, under the old privileges: a
    ``COMMIT`` or ``FETCH`` after the change would use them. A cancel alone does not stop it:
    a backend idle in a transaction ignores one, and a statement cancelled inside a
    transaction with a savepoint leaves it to ``ROLLBACK TO SAVEPOINT`` and commit. First
    waits up to ``wait`` seconds for the statements cancelled just before to stop (one
    outside a transaction block then leaves nothing open and its session goes on). Returns
    the pids terminated."""
    database = pools.admin_database

    def active(sess: AdminSession) -> int:
        return int(sess.run(_OLD_ACTIVE, role=role, before=before)[0][0])

    def terminate(sess: AdminSession) -> list[int]:
        rows = sess.run(_TERMINATE_OLD, role=role, before=before)
        return [int(r[0]) for r in rows if r[1]]

    with trio.move_on_after(wait):
        while await pools.run(database, active):
            await trio.sleep(POLL_INTERVAL)
    return await pools.run(database, terminate)


def escaped_literal(text: str) -> str:
    """``text`` as an ``E'...'`` literal: read the same whatever the server's
    ``standard_conforming_strings`` (a plain ``'...'`` literal holding a backslash is not)."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


async def rollback_prepared(pools: AdminPools, role: str, before: datetime) -> list[str]:
    """``ROLLBACK PREPARED`` every transaction ``role`` prepared before ``before`` (the
    server's clock); returns their gids. A prepared transaction has left its session: it
    keeps its rows (to be committed by its owner whenever it likes), its locks and the
    cluster's oldest transaction, whatever happens to the session or the grant. Only its
    owner or a superuser may finish it, so the admin does it as the role (``SET ROLE``: it
    is a member of each role it provisions) in the transaction's database, on a session that
    is closed afterwards rather than pooled with the role set. The gid is the caller's text:
    it reaches SQL only as an escaped literal. One already finished is skipped; any other
    failure is raised once every gid was tried."""

    def listed(sess: AdminSession) -> list[tuple[str, str]]:
        return [(str(r[0]), str(r[1])) for r in sess.run(_PREPARED, role=role, before=before)]

    done: list[str] = []
    failed: AdminError | None = None
    for gid, database in await pools.run(pools.admin_database, listed):

        def rollback(sess: AdminSession, gid: str = gid) -> None:
            try:
                sess.run(f"SET ROLE {identifier(role)}")
                sess.run(f"ROLLBACK PREPARED {escaped_literal(gid)}")
            finally:
                sess.close()

        try:
            await pools.run(database, rollback)
        except AdminError as exc:
            if exc.sqlstate != "42704":  # finished by its owner meanwhile
                failed = failed or exc
            continue
        done.append(gid)
    if failed is not None:
        raise failed
    return done


async def terminate_pids(pools: AdminPools, role: str, pids: Collection[int]) -> list[int]:
    """Terminate those of ``pids`` that are still backends of ``role``; returns them."""

    def run(sess: AdminSession) -> list[int]:
        rows = sess.run(_TERMINATE_PIDS, role=role, pids=sorted(int(p) for p in pids))
        return [int(r[0]) for r in rows if r[1]]

    return await pools.run(pools.admin_database, run)


async def server_max_connections(pools: AdminPools) -> int:
    """The server's ``max_connections`` (the pool's ``pool_max_idle`` is a share of it)."""

    def run(sess: AdminSession) -> int:
        return int(sess.run("SELECT pg_catalog.current_setting('max_connections')")[0][0])

    return await pools.run(pools.admin_database, run)


__all__ = [
    "cancel_role_statements",
    "end_transactions_begun_before",
    "escaped_literal",
    "rollback_prepared",
    "server_max_connections",
    "server_now",
    "terminate_pid",
    "terminate_pids",
    "terminate_role_backends",
]
