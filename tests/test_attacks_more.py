"""Attacks by a caller with a live session on a grant that is lowered while it holds a
transaction open, on PostgreSQL 15 and 18 through a real Waypoint.

Revalidation cancels the statements a role's backends are running when its grant changes:
they passed their privilege checks under the old grant. A transaction is the same thing
spread over several statements: rows written under ``readwrite`` wait uncommitted while the
client sits idle in the transaction, and a ``COMMIT`` sent after the downgrade to
``readonly`` would make them land. A cancel does nothing to a backend idle in a transaction,
and a statement cancelled inside one leaves a transaction the client can take back with
``ROLLBACK TO SAVEPOINT`` and commit. So a changed grant ends every transaction of the role
that began before the change (its backend is terminated), and each attack here must leave
the table as it was.

With ``max_prepared_transactions`` above zero (an operator's choice, for XA), a transaction
can also outlive its session: ``PREPARE TRANSACTION`` detaches it, with its rows and locks,
from the backend, and only its owner (or a superuser) may finish it. Written under
``readwrite`` and committed with ``COMMIT PREPARED`` after the downgrade, its rows would land;
left prepared by a caller whose grant is then revoked, it holds its locks and the cluster's
oldest transaction for ever. So a changed grant rolls back the role's prepared transactions
from before the change, and a revoked grant all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_support import E2EEnv, RawSession, create_app_database, e2e_env, wait_running
from fixtures_pg import PrivatePg
from pgcluster import PgCluster

from waypoint.app import Running
from waypoint.provision.backends import escaped_literal

BOUND = 20.0
RW = {"permissions": ["readwrite"]}
RO = {"permissions": ["readonly"]}
PEER = "127.0.0.31"


def _passes(running: Running) -> float:
    for family in running.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "waypoint_revalidation_runs_total":
                return sample.value
    return 0.0


def _role_of(cluster: PgCluster, pid: int) -> str:
    rows = cluster.execute(
        "SELECT usename::text FROM pg_catalog.pg_stat_activity WHERE pid = :p", p=pid
    )
    return str(rows[0][0])


def _may(cluster: PgCluster, role: str, db: str, table: str, privilege: str) -> bool:
    rows = cluster.execute(
        "SELECT pg_catalog.has_schema_privilege(:r, pg_catalog.split_part(:t, '.', 1), 'USAGE') "
        "AND pg_catalog.has_table_privilege(:r, :t, :p)",
        r=role,
        t=table,
        p=privilege,
        dbname=db,
    )
    return bool(rows[0][0])


def _ids(cluster: PgCluster, db: str) -> list[int]:
    rows = cluster.execute("SELECT id FROM public.t ORDER BY id", dbname=db)
    return [int(r[0]) for r in rows]


async def _wait_downgrade_applied(
    running: Running,
    cluster: PgCluster,
    role: str,
    db: str,
    lost: tuple[str, str] = ("public.t", "INSERT"),
) -> None:
    """Until the role has lost ``lost`` (table, privilege) and the revalidation pass that
    took it away is over: the next pass has started (passes run one after another; one is
    counted only while a session is open), or no session is left."""
    with trio.fail_after(BOUND):
        while await trio.to_thread.run_sync(_may, cluster, role, db, *lost):
            await trio.sleep(0.05)
        seen = _passes(running)
        while _passes(running) < seen + 1 and len(running.registry) > 0:
            await trio.sleep(0.05)


def _outcome(raw: RawSession, sql: str | None) -> str:
    """What the client gets for ``sql`` (``None``: for what it sent before): a result, an
    error, or ``closed``."""
    try:
        if sql is not None:
            raw.send_query(sql)
        return raw.read_result(timeout=15)
    except (AssertionError, OSError):
        return "closed"


@contextlib.asynccontextmanager
async def _caller(
    env: E2EEnv, db: str, grant: Mapping[str, Any], first: str | None = None
) -> AsyncIterator[tuple[RawSession, str]]:
    """The peer holding ``grant`` on ``db``, logged in, having run ``first`` without an
    error: its session and its role (the session is closed at the end of the block)."""
    env.grant(PEER, {db: grant})
    raw = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source=PEER))
    try:
        if first is not None:
            result = await trio.to_thread.run_sync(_outcome, raw, first)
            assert not result.startswith(("error", "closed")), result
        yield raw, await trio.to_thread.run_sync(_role_of, env.cluster, raw.pid)
    finally:
        raw.close()


async def test_rows_written_before_a_downgrade_cannot_be_committed_after_it(
    pg: PgCluster, tmp_path: Path
) -> None:
    """A readwrite caller inserts in an open transaction and waits, idle in it; its grant
    becomes readonly; its ``COMMIT`` must not land the row."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        first = "BEGIN; INSERT INTO public.t VALUES (2, 'rw')"
        async with _caller(env, db, RW, first) as (raw, role):
            env.grant(PEER, {db: RO})
            await _wait_downgrade_applied(env.running, pg, role, db)
            committed = await trio.to_thread.run_sync(_outcome, raw, "COMMIT")
            assert await trio.to_thread.run_sync(_ids, pg, db) == [1], committed
            assert not committed.startswith("ok"), committed
        await env.assert_clean()


async def test_a_cancelled_statement_cannot_be_rolled_back_to_a_savepoint_and_committed(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The downgrade's cancel fails the running statement, but inside a transaction with a
    savepoint the client can roll back to the savepoint and commit what it wrote before:
    the row must not land."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        async with _caller(env, db, RW) as (raw, role):
            raw.send_query(
                "BEGIN; INSERT INTO public.t VALUES (2, 'rw'); SAVEPOINT s; "
                "SELECT pg_catalog.pg_sleep(30)"
            )
            await wait_running(pg, raw.pid, "pg_sleep")
            env.grant(PEER, {db: RO})
            await _wait_downgrade_applied(env.running, pg, role, db)
            cancelled = await trio.to_thread.run_sync(_outcome, raw, None)
            assert cancelled.startswith("error:") or cancelled == "closed", cancelled
            revived = await trio.to_thread.run_sync(_outcome, raw, "ROLLBACK TO SAVEPOINT s")
            committed = await trio.to_thread.run_sync(_outcome, raw, "COMMIT")
            assert await trio.to_thread.run_sync(_ids, pg, db) == [1], (revived, committed)
        await env.assert_clean()


async def test_a_cursor_opened_before_a_downgrade_reads_nothing_after_it(
    pg: PgCluster, tmp_path: Path
) -> None:
    """A readonly caller on schemas ``public`` and ``secret`` opens a cursor on a table of
    ``secret`` and waits; its grant drops ``secret``; its ``FETCH`` must return no row (the
    cursor's privilege check ran when it was opened, and a cancel leaves an idle backend
    alone)."""
    db = create_app_database(pg)
    pg.execute(
        f"SET ROLE {pg.admin_user}; CREATE SCHEMA secret; "
        "CREATE TABLE secret.s (v text); INSERT INTO secret.s VALUES ('classified')",
        dbname=db,
    )
    both = {"permissions": ["readonly"], "schemas": ["public", "secret"]}
    public = {"permissions": ["readonly"], "schemas": ["public"]}
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        first = "BEGIN; DECLARE c CURSOR FOR SELECT v FROM secret.s"
        async with _caller(env, db, both, first) as (raw, role):
            env.grant(PEER, {db: public})
            await _wait_downgrade_applied(env.running, pg, role, db, ("secret.s", "SELECT"))
            fetched = await trio.to_thread.run_sync(_outcome, raw, "FETCH ALL FROM c")
            assert "classified" not in fetched, fetched
        await env.assert_clean()


async def test_a_transaction_begun_after_the_downgrade_goes_on(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The other side: only transactions older than the change end. A session idle outside
    a transaction at the downgrade stays open, and its next transaction runs with the new
    grant (a write is refused, a read works). Not on 15, where it may have switched to the
    group it left: there it ends (``28000``, see the last test)."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        async with _caller(env, db, RW, "select 1") as (raw, role):
            env.grant(PEER, {db: RO})
            await _wait_downgrade_applied(env.running, pg, role, db)
            if pg.version < 16:
                fatal = await trio.to_thread.run_sync(lambda: raw.read_until_closed(timeout=15))
                assert fatal.get("C") == "28000" and "SET ROLE" in fatal.get("M", ""), fatal
            else:
                refused = await trio.to_thread.run_sync(
                    _outcome, raw, "BEGIN; INSERT INTO public.t VALUES (3, 'ro')"
                )
                assert refused.startswith("error:42501:"), refused
                assert await trio.to_thread.run_sync(_outcome, raw, "ROLLBACK") == ""
                read = await trio.to_thread.run_sync(
                    _outcome, raw, "SELECT pg_catalog.count(*) FROM public.t"
                )
                assert read == "ok:1", read
        await env.assert_clean()


# --- prepared transactions ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["system", "18"], ids=["pg15", "pg18"])
def pg_2pc(request: pytest.FixtureRequest, private_pg: PrivatePg) -> Iterator[PgCluster]:
    """A cluster that allows prepared transactions (off by default in PostgreSQL), with
    ``standard_conforming_strings`` off (a legacy setting some servers keep), where a plain
    ``'...'`` literal holding a backslash would end early."""
    settings = {"max_prepared_transactions": "8", "standard_conforming_strings": "off"}
    with private_pg(request.param, settings=settings) as cluster:
        yield cluster


def _prepared(cluster: PgCluster, role: str) -> list[str]:
    rows = cluster.execute(
        "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE owner = :r ORDER BY 1", r=role
    )
    return [str(r[0]) for r in rows]


async def test_a_transaction_prepared_before_a_downgrade_cannot_be_committed_after_it(
    pg_2pc: PgCluster, tmp_path: Path
) -> None:
    """A readwrite caller prepares a transaction holding an insert (its session is then
    idle, outside any transaction); its grant becomes readonly; ``COMMIT PREPARED`` must not
    land the row. The gid carries a quote and a backslash: it reaches the admin's SQL only
    as a literal."""
    pg = pg_2pc
    db = create_app_database(pg)
    gid = "w'\\'; x"
    first = (
        f"BEGIN; INSERT INTO public.t VALUES (2, 'rw'); PREPARE TRANSACTION {escaped_literal(gid)}"
    )
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        async with _caller(env, db, RW, first) as (raw, role):
            assert await trio.to_thread.run_sync(_prepared, pg, role) == [gid]
            env.grant(PEER, {db: RO})
            await _wait_downgrade_applied(env.running, pg, role, db)
            committed = await trio.to_thread.run_sync(
                _outcome, raw, f"COMMIT PREPARED {escaped_literal(gid)}"
            )
            assert await trio.to_thread.run_sync(_ids, pg, db) == [1], committed
            assert await trio.to_thread.run_sync(_prepared, pg, role) == []
        await env.assert_clean()


async def test_a_revoked_readonly_caller_leaves_no_prepared_transaction_holding_locks(
    pg_2pc: PgCluster, tmp_path: Path
) -> None:
    """With the weakest grant: a readonly caller reads a table in a transaction and prepares
    it, which keeps the table's lock (and the oldest transaction) after its session. Its grant
    is revoked: nothing of it may stay, so the table's owner can take its lock again."""
    pg = pg_2pc
    db = create_app_database(pg)
    first = "BEGIN; SELECT pg_catalog.count(*) FROM public.t; PREPARE TRANSACTION 'hold'"
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        async with _caller(env, db, RO, first) as (raw, role):
            env.grant(PEER, rules=[])
            fatal = await trio.to_thread.run_sync(lambda: raw.read_until_closed(timeout=15))
            assert fatal.get("C") == "28000", fatal
        with trio.fail_after(BOUND):
            while await trio.to_thread.run_sync(_prepared, pg, role):
                await trio.sleep(0.05)
        await trio.to_thread.run_sync(
            lambda: pg.execute(
                f"SET ROLE {pg.admin_user}; SET lock_timeout = '5s'; "
                "BEGIN; LOCK TABLE public.t IN ACCESS EXCLUSIVE MODE; COMMIT",
                dbname=db,
            )
        )
        await env.assert_clean()


async def test_a_transaction_prepared_in_an_ended_session_cannot_be_committed_after_a_downgrade(
    pg_2pc: PgCluster, tmp_path: Path
) -> None:
    """The same without a live session for revalidation to find: the caller prepares, leaves,
    and comes back after its grant became readonly; the provision that lowers its role
    rolls the prepared transaction back before its ``COMMIT PREPARED`` can run."""
    pg = pg_2pc
    db = create_app_database(pg)
    first = "BEGIN; INSERT INTO public.t VALUES (2, 'rw'); PREPARE TRANSACTION 'later'"
    async with e2e_env(pg, tmp_path) as env:
        async with _caller(env, db, RW, first) as (_, role):
            pass
        await env.assert_clean()
        async with _caller(env, db, RO) as (again, role_again):
            assert role_again == role
            assert not await trio.to_thread.run_sync(_may, pg, role, db, "public.t", "INSERT")
            committed = await trio.to_thread.run_sync(_outcome, again, "COMMIT PREPARED 'later'")
            assert await trio.to_thread.run_sync(_ids, pg, db) == [1], committed
            assert committed.startswith("error:42704:"), committed
        await env.assert_clean()


# --- SET ROLE to a group the caller then leaves ---------------------------------------------


def _groups_of(cluster: PgCluster, role: str) -> list[str]:
    rows = cluster.execute(
        "SELECT g.rolname::text FROM pg_catalog.pg_auth_members AS m "
        "JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid "
        "JOIN pg_catalog.pg_roles AS r ON r.oid = m.member WHERE r.rolname = :r ORDER BY 1",
        r=role,
    )
    return [str(r[0]) for r in rows]


async def test_a_session_set_to_a_group_it_then_leaves_writes_nothing_after_the_downgrade(
    pg: PgCluster, tmp_path: Path
) -> None:
    """A readwrite caller switches its session to its readwrite group (``SET ROLE``; the group
    names are in ``pg_auth_members``, readable by everyone); its grant becomes readonly,
    which revokes that membership, but PostgreSQL checks membership only when ``SET ROLE``
    runs: the session would go on writing as the group. On 16 and later the membership has
    no SET option, so the ``SET ROLE`` itself is refused."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path, revalidation_interval="1s") as env:
        async with _caller(env, db, RW) as (raw, role):
            groups = await trio.to_thread.run_sync(_groups_of, pg, role)
            switched = [
                await trio.to_thread.run_sync(_outcome, raw, f"SET ROLE {g}") for g in groups
            ]
            env.grant(PEER, {db: RO})
            await _wait_downgrade_applied(env.running, pg, role, db)
            wrote = await trio.to_thread.run_sync(
                _outcome, raw, "INSERT INTO public.t VALUES (2, 'as the group')"
            )
            assert await trio.to_thread.run_sync(_ids, pg, db) == [1], (groups, switched, wrote)
        await env.assert_clean()
