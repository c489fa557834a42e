"""The role reaper and prepared transactions, on PostgreSQL 15 and 18 clusters of this module's
own: ``max_prepared_transactions`` above zero (an operator's choice, for XA) and
``standard_conforming_strings`` off (a legacy setting some servers keep).

A transaction a role prepared (``PREPARE TRANSACTION``) outlives its session: it keeps its
rows, its locks and the cluster's oldest transaction until its owner or a superuser ends it.
``DROP ROLE`` does not refuse such a role: it drops it and leaves the transaction with no
owner, which only a superuser can end. So the reaper rolls a role's prepared transactions
back, as the role, before it drops or retires it; a rollback that fails keeps the role for
the next pass and is reported.

With ``standard_conforming_strings`` off a plain ``'...'`` literal holding a backslash is
read with escapes: the admin's sessions pin it on, so the markers Waypoint writes (a JSON
text, which escapes a quote in a login with a backslash) are stored exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pg8000.native
import pytest
import test_reaper_pg
import trio
from fixtures_pg import PrivatePg
from pg8000.native import identifier
from pgcluster import PgCluster
from provision_support import role_exists, role_marker_login
from test_cli_roles import write_config
from test_reaper_pg import ALICE, LISTENER, Env, connect_as, expire, grant, new_prefix, run_as

from waypoint.cli.main import main
from waypoint.grants import naming
from waypoint.grants.model import Preset
from waypoint.identity.model import Identity
from waypoint.provision.backends import escaped_literal
from waypoint.provision.engine import Credentials

# Both JSON-escaped in the marker (a backslash each): read with escapes, the marker breaks.
ODD = Identity(login='o"brien\\ops@example.com', node="odd-laptop")
GID = "w'\\'; x"


@pytest.fixture(scope="module", params=["system", "18"], ids=["pg15", "pg18"])
def pg(request: pytest.FixtureRequest, private_pg: PrivatePg) -> Iterator[PgCluster]:
    """This module's cluster (``pg_db`` and ``app_db`` take it too)."""
    settings = {"max_prepared_transactions": "8", "standard_conforming_strings": "off"}
    with private_pg(request.param, settings=settings) as cluster:
        yield cluster


# Fixtures of the reaper's suite, taking this module's ``pg``.
app_db = test_reaper_pg.app_db
env = test_reaper_pg.env

def _prepared(pg: PgCluster, gid: str) -> list[list[object]]:
    """``[owner]`` of the prepared transaction ``gid`` (owner None: its role was dropped)."""
    return pg.execute("SELECT owner::text FROM pg_catalog.pg_prepared_xacts WHERE gid = :g", g=gid)


def _prepare(pg: PgCluster, creds: Credentials, db: str, sql: str, gid: str) -> None:
    """``sql`` in a transaction the role prepares as ``gid``; its session then ends."""
    conn = connect_as(pg, creds, db)
    try:
        conn.run("BEGIN")
        conn.run(sql)
        conn.run(f"PREPARE TRANSACTION {escaped_literal(gid)}")
    finally:
        conn.close()


def _rollback_as_superuser(pg: PgCluster, gid: str) -> None:
    for (database,) in pg.execute(
        "SELECT database::text FROM pg_catalog.pg_prepared_xacts WHERE gid = :g", g=gid
    ):
        pg.execute(f"ROLLBACK PREPARED {escaped_literal(gid)}", dbname=str(database))


async def test_an_expired_role_with_a_prepared_transaction_is_dropped_after_its_rollback(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """The caller prepares an insert and leaves; its role expires. The dry run says the
    transaction would be rolled back; the pass rolls it back (the row never lands, the
    table's lock is free) and drops the role, leaving no transaction without an owner."""
    creds = await env.provision(ALICE, grant(app_db, (Preset.READWRITE, "public")))
    try:
        await trio.to_thread.run_sync(
            _prepare, pg, creds, app_db, "INSERT INTO public.t (v) VALUES ('prepared')", GID
        )
        assert _prepared(pg, GID) == [[creds.role]]
        expire(pg, creds.role)

        with trio.fail_after(60):
            plan = await env.reaper().run_pass(dry_run=True)
        assert plan.dropped_roles == (creds.role,)
        assert plan.rolled_back == ((creds.role, 1),), plan
        assert _prepared(pg, GID) == [[creds.role]]

        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.dropped_roles == (creds.role,), report
        assert report.rolled_back == ((creds.role, 1),), report
        assert report.failed == ()
        assert not role_exists(pg, creds.role)
        assert _prepared(pg, GID) == []
        assert pg.execute("SELECT count(*) FROM public.t WHERE v = 'prepared'", dbname=app_db) == [
            [0]
        ]
        pg.execute(
            "SET lock_timeout = '5s'; BEGIN; LOCK TABLE public.t IN ACCESS EXCLUSIVE MODE; COMMIT",
            dbname=app_db,
        )
    finally:
        _rollback_as_superuser(pg, GID)


def test_roles_reap_says_which_prepared_transactions_it_rolls_back(
    pg: PgCluster, app_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``waypoint roles reap --dry-run`` names the prepared transactions a pass would roll
    back (and leaves them); the pass itself says it rolled them back."""
    prefix = new_prefix()

    async def provision() -> Credentials:
        env = Env(pg, prefix, test_reaper_pg.listener_for(pg, prefix))
        try:
            return await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
        finally:
            await env.prov.aclose()

    creds = trio.run(provision)
    gid = "cli-shows-me"
    try:
        _prepare(pg, creds, app_db, "SELECT pg_catalog.count(*) FROM public.t", gid)
        expire(pg, creds.role)
        config = write_config(pg, tmp_path, prefix)

        assert main(["roles", "reap", "-c", str(config), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"{LISTENER}: would roll back 1 prepared transaction(s) of {creds.role}" in out
        assert f"{LISTENER}: would drop role {creds.role}" in out
        assert _prepared(pg, gid) == [[creds.role]]

        assert main(["roles", "reap", "-c", str(config)]) == 0
        out = capsys.readouterr().out
        assert f"{LISTENER}: rolled back 1 prepared transaction(s) of {creds.role}" in out
        assert f"{LISTENER}: dropped role {creds.role}" in out
        assert _prepared(pg, gid) == []
    finally:
        _rollback_as_superuser(pg, gid)


async def test_an_expired_role_owning_objects_is_retired_after_its_rollback(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """A role that owns a table is retired, not dropped: its prepared transaction (which
    holds a lock on its own table) goes all the same. Its login holds a quote and a
    backslash: the retired marker names it exactly."""
    creds = await env.provision(ODD, grant(app_db, (Preset.ADMIN, "app")))
    assert role_marker_login(pg, creds.role) == ODD.login
    gid = "retire-me"
    try:
        await run_as(pg, creds, app_db, "CREATE TABLE app.mine (x int)")
        await trio.to_thread.run_sync(
            _prepare, pg, creds, app_db, "INSERT INTO app.mine VALUES (7)", gid
        )
        expire(pg, creds.role)
        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.retired_roles == (creds.role,), report
        assert report.rolled_back == ((creds.role, 1),), report
        assert report.failed == ()
        assert _prepared(pg, gid) == []
        assert pg.execute("SELECT count(*) FROM app.mine", dbname=app_db) == [[0]]
        assert role_marker_login(pg, creds.role) == ODD.login
        (comment,) = pg.execute(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = :r",
            r=creds.role,
        )[0]
        assert str(comment).startswith("waypoint:v1 retired "), comment
    finally:
        _rollback_as_superuser(pg, gid)


async def test_a_rollback_that_fails_keeps_the_role_and_is_reported(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """The role prepared its transaction in a database that then stops accepting
    connections: the rollback fails, so the role is not dropped (that would leave the
    transaction with no owner); the pass reports it, and the next pass, once the database
    accepts connections again, finishes."""
    creds = await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
    other_db = f"{app_db}_other"
    gid = "unreachable"
    pg.create_database(other_db)
    try:
        await trio.to_thread.run_sync(_prepare, pg, creds, other_db, "SELECT 1", gid)
        pg.execute(f"ALTER DATABASE {identifier(other_db)} ALLOW_CONNECTIONS false")
        expire(pg, creds.role)

        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.dropped_roles == (), report
        assert [f.role for f in report.failed] == [creds.role], report
        assert "prepared transaction" in report.failed[0].reason, report.failed
        assert role_exists(pg, creds.role)
        assert _prepared(pg, gid) == [[creds.role]]

        pg.execute(f"ALTER DATABASE {identifier(other_db)} ALLOW_CONNECTIONS true")
        with trio.fail_after(60):
            again = await env.reaper().run_pass()
        assert again.dropped_roles == (creds.role,), again
        assert again.rolled_back == ((creds.role, 1),), again
        assert _prepared(pg, gid) == []
    finally:
        pg.execute(f"ALTER DATABASE {identifier(other_db)} ALLOW_CONNECTIONS true")
        _rollback_as_superuser(pg, gid)
        pg.drop_database(other_db)


async def test_a_memberless_groups_prepared_transaction_is_rolled_back_before_its_drop(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """On 15 a member may ``SET ROLE`` to its group and prepare a transaction the group owns;
    once the member is reaped the memberless group is dropped, its transaction rolled back
    first (as the group). On 16 and later the ``SET ROLE`` is refused: no group owns one."""
    creds = await env.provision(ALICE, grant(app_db, (Preset.READWRITE, "public")))
    group = naming.group_name(env.prefix, Preset.READWRITE, "public", app_db)
    gid = "the-groups"
    sql = f"SET ROLE {identifier(group)}; INSERT INTO public.t (v) VALUES ('group')"
    try:
        if pg.version >= 16:
            with pytest.raises(pg8000.native.DatabaseError, match="42501"):
                await trio.to_thread.run_sync(_prepare, pg, creds, app_db, sql, gid)
            return
        await trio.to_thread.run_sync(_prepare, pg, creds, app_db, sql, gid)
        assert _prepared(pg, gid) == [[group]]
        expire(pg, creds.role)

        with trio.fail_after(60):
            plan = await env.reaper().run_pass(dry_run=True)
        assert plan.dropped_groups == (group,) and plan.rolled_back == ((group, 1),), plan

        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.dropped_roles == (creds.role,), report
        assert report.dropped_groups == (group,), report
        assert report.rolled_back == ((group, 1),), report
        assert not role_exists(pg, group)
        assert _prepared(pg, gid) == []
        assert pg.execute("SELECT count(*) FROM public.t WHERE v = 'group'", dbname=app_db) == [[0]]
    finally:
        _rollback_as_superuser(pg, gid)


async def test_admin_sessions_read_literals_with_standard_conforming_strings(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """The cluster, and here also the admin's database and role, default to
    ``standard_conforming_strings = off``: the marker of a login holding a quote and a
    backslash is still stored exactly, and the role is still found to be Waypoint's."""
    admin = identifier(pg.admin_user)
    pg.execute(f"ALTER ROLE {admin} SET standard_conforming_strings = off")
    try:
        creds = await env.provision(ODD, grant(app_db, (Preset.READONLY, "public")))
        assert role_marker_login(pg, creds.role) == ODD.login
        again = await env.provision(ODD, grant(app_db, (Preset.READONLY, "public")))
        assert again.role == creds.role
        conn = pg8000.native.Connection(
            user=pg.admin_user,
            password=pg.admin_password,
            host=pg.host,
            port=pg.port,
            database=app_db,
        )
        try:
            assert conn.run("SHOW standard_conforming_strings") == [["off"]]
        finally:
            conn.close()
    finally:
        pg.execute(f"ALTER ROLE {admin} RESET standard_conforming_strings")
