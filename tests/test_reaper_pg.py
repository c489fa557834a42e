"""The role reaper on throwaway PostgreSQL 15 and 18 clusters, with the NON-superuser admin.

Roles are provisioned through the real :class:`Provisioner`, then expired with SQL
(``VALID UNTIL`` in the past, as the server's clock decides). Each test uses its own
``user_prefix`` so that roles of other tests in the shared cluster are out of its sight.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import pg8000.native
import pytest
import trio
from pg8000.native import identifier, literal
from pgcluster import PgCluster
from provision_support import role_exists, setup_app_db

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.grants import naming
from waypoint.grants.model import EffectiveGrant, Preset, SchemaPrivilege
from waypoint.identity.model import Identity
from waypoint.provision.engine import Credentials, Provisioner
from waypoint.reaper import Reaper

ALICE = Identity(login="alice@example.com", node="alice-laptop")
BOB = Identity(login="bob@example.com", node="bob-laptop")
LISTENER = "pg-main"
_prefix_counter = itertools.count(1)


def new_prefix() -> str:
    return f"r{os.getpid() % 100000}x{next(_prefix_counter)}_"


def listener_for(pg: PgCluster, prefix: str, **pgopts: Any) -> ListenerConfig:
    return ListenerConfig(
        name=LISTENER,
        listen="127.0.0.1:0",
        backend=f"{pg.host}:{pg.port}",
        backend_tls="disable",
        postgres=PostgresListenerConfig(
            admin_user=pg.admin_user,
            admin_password=pg.admin_password,
            user_prefix=prefix,
            **pgopts,
        ),
    )


def grant(db: str, *pairs: tuple[Preset, str]) -> EffectiveGrant:
    return EffectiveGrant(
        listener=LISTENER,
        database=db,
        privileges=frozenset(SchemaPrivilege(p, s) for p, s in pairs),
    )


def expire(pg: PgCluster, role: str) -> None:
    """``VALID UNTIL`` in the past (the superuser; the server's clock decides expiry)."""
    pg.execute(f"ALTER ROLE {identifier(role)} VALID UNTIL {literal('2000-01-01 00:00:00+00')}")


def connect_as(pg: PgCluster, creds: Credentials, db: str) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        user=creds.role, password=creds.secret, host=pg.host, port=pg.port, database=db, timeout=30
    )


async def run_as(pg: PgCluster, creds: Credentials, db: str, sql: str) -> None:
    def go() -> None:
        conn = connect_as(pg, creds, db)
        try:
            conn.run(sql)
        finally:
            conn.close()

    await trio.to_thread.run_sync(go)


class Env:
    """A provisioner and a reaper for one test's prefix."""

    def __init__(self, pg: PgCluster, prefix: str, listener: ListenerConfig) -> None:
        self.pg = pg
        self.prefix = prefix
        self.listener = listener
        self.prov = Provisioner(listener, handshake_timeout=15.0)
        self.in_use: set[str] = set()

    def reaper(self, **kwargs: Any) -> Reaper:
        in_use: Callable[[], Collection[str]] = lambda: set(self.in_use)  # noqa: E731
        return Reaper(self.listener, self.prov, roles_in_use=in_use, **kwargs)

    async def provision(self, who: Identity, g: EffectiveGrant) -> Credentials:
        with trio.fail_after(30):
            async with self.prov.credentials(who, g) as creds:
                return creds


@pytest.fixture
def app_db(pg: PgCluster, pg_db: str) -> str:
    """A fresh database set up as the application's (:func:`setup_app_db`); the ownership,
    orphan and ``waypoint roles`` suites take this fixture from here."""
    setup_app_db(pg, pg_db)
    return pg_db


@pytest.fixture
async def env(pg: PgCluster) -> AsyncIterator[Env]:
    """A provisioner and a reaper of a prefix of this test's own (shared like ``app_db``)."""
    prefix = new_prefix()
    e = Env(pg, prefix, listener_for(pg, prefix))
    try:
        yield e
    finally:
        await e.prov.aclose()


async def test_expired_idle_role_owning_nothing_is_dropped_with_its_group(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    g = grant(app_db, (Preset.ADMIN, "app"))
    creds = await env.provision(ALICE, g)
    await run_as(pg, creds, app_db, "INSERT INTO app.t (v) VALUES ('kept')")
    group = naming.group_name(env.prefix, Preset.ADMIN, "app", app_db)
    assert role_exists(pg, group)
    expire(pg, creds.role)

    with trio.fail_after(60):
        report = await env.reaper().run_pass()

    assert report.dropped_roles == (creds.role,)
    assert report.retired_roles == ()
    assert report.dropped_groups == (group,), report  # its only member is gone
    assert report.failed == () and not report.dry_run
    assert not role_exists(pg, creds.role)
    assert not role_exists(pg, group)
    assert pg.execute("SELECT count(*) FROM app.t WHERE v = 'kept'", dbname=app_db) == [[1]]

    # Idempotent: the next pass finds nothing to do.
    with trio.fail_after(60):
        again = await env.reaper().run_pass()
    assert (again.dropped_roles, again.dropped_groups, again.failed) == ((), (), ())


async def test_expired_role_owning_a_table_is_retired_and_the_table_kept(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    g = grant(app_db, (Preset.ADMIN, "app"))
    creds = await env.provision(ALICE, g)
    await run_as(
        pg, creds, app_db, "CREATE TABLE app.mine (x int); INSERT INTO app.mine VALUES (7)"
    )
    group = naming.group_name(env.prefix, Preset.ADMIN, "app", app_db)
    expire(pg, creds.role)

    with trio.fail_after(60):
        report = await env.reaper().run_pass()

    assert report.retired_roles == (creds.role,), report
    assert report.dropped_roles == () and report.failed == ()
    assert report.dropped_groups == (group,), report  # its only member left it
    assert role_exists(pg, creds.role) and not role_exists(pg, group)
    # The table survives with its rows, still the caller's own (never the admin's).
    assert pg.execute(
        "SELECT tableowner FROM pg_tables WHERE schemaname = 'app' AND tablename = 'mine'",
        dbname=app_db,
    ) == [[creds.role]]
    assert pg.execute("SELECT x FROM app.mine", dbname=app_db) == [[7]]
    with pytest.raises(pg8000.native.DatabaseError):
        await run_as(pg, creds, app_db, "SELECT 1")  # NOLOGIN, no password

    # The next pass leaves the retired role alone.
    with trio.fail_after(60):
        again = await env.reaper().run_pass()
    assert (again.dropped_roles, again.retired_roles, again.failed) == ((), (), ())


async def test_reassign_to_names_the_new_owner_of_reaped_objects(
    pg: PgCluster, app_db: str
) -> None:
    prefix = new_prefix()
    pg.execute(f"GRANT app_owner TO {pg.admin_user}")
    env = Env(pg, prefix, listener_for(pg, prefix, reassign_to="app_owner"))
    try:
        creds = await env.provision(ALICE, grant(app_db, (Preset.ADMIN, "app")))
        await run_as(pg, creds, app_db, "CREATE TABLE app.kept (x int)")
        # app_owner qualifies: NOLOGIN, no attributes, a member of no role.
        expire(pg, creds.role)
        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.dropped_roles == (creds.role,), report
        assert pg.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'app' AND tablename = 'kept'",
            dbname=app_db,
        ) == [["app_owner"]]
    finally:
        await env.prov.aclose()


async def test_role_with_live_session_is_kept(pg: PgCluster, app_db: str, env: Env) -> None:
    creds = await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
    conn = await trio.to_thread.run_sync(connect_as, pg, creds, app_db)
    try:
        expire(pg, creds.role)
        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.dropped_roles == ()
        assert [s.role for s in report.skipped] == [creds.role]
        assert "live session" in report.skipped[0].reason
        assert role_exists(pg, creds.role)
        # The live session still works.
        assert conn.run("SELECT count(*) FROM public.t") == [[1]]
    finally:
        await trio.to_thread.run_sync(conn.close)


async def test_role_in_use_by_this_instance_is_kept(pg: PgCluster, app_db: str, env: Env) -> None:
    creds = await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
    expire(pg, creds.role)
    env.in_use.add(creds.role)
    with trio.fail_after(60):
        report = await env.reaper().run_pass()
    assert report.dropped_roles == ()
    assert report.skipped[0].role == creds.role
    assert report.skipped[0].reason == "in use by this instance"
    assert role_exists(pg, creds.role)


async def test_roles_without_waypoint_marker_are_never_touched(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    p = env.prefix
    bare = f"{p}pg_main_mallory_x_db"
    forged = f"{p}pg_main_eve_x_db"
    lonely_group = f"{p}grp_readonly_public_x_00000000"
    pg.psql(
        f"CREATE ROLE {bare} LOGIN VALID UNTIL '2000-01-01';"
        f"CREATE ROLE {forged} LOGIN VALID UNTIL '2000-01-01';"
        f"COMMENT ON ROLE {forged} IS 'waypoint:v1 not json';"
        f"CREATE ROLE {lonely_group} NOLOGIN;"
    )
    # The prefix's '_' is not a LIKE wildcard: a marked role that differs there is not ours.
    lookalike_prefix = p[:-1] + "z"
    lookalike = await Env(pg, lookalike_prefix, listener_for(pg, lookalike_prefix)).provision(
        BOB, grant(app_db, (Preset.READONLY, "public"))
    )
    expire(pg, lookalike.role)
    with trio.fail_after(60):
        report = await env.reaper().run_pass()
    touched = {*report.dropped_roles, *report.dropped_groups, *(s.role for s in report.skipped)}
    assert not touched & {bare, forged, lonely_group, lookalike.role}
    for role in (bare, forged, lonely_group, lookalike.role):
        assert role_exists(pg, role), role


async def test_group_with_members_is_kept_and_dropped_once_unused(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    g = grant(app_db, (Preset.READONLY, "public"))
    alice = await env.provision(ALICE, g)
    bob = await env.provision(BOB, g)
    group = naming.group_name(env.prefix, Preset.READONLY, "public", app_db)
    expire(pg, alice.role)
    with trio.fail_after(60):
        first = await env.reaper().run_pass()
    assert first.dropped_roles == (alice.role,)
    assert first.dropped_groups == ()
    assert role_exists(pg, group) and role_exists(pg, bob.role)

    expire(pg, bob.role)
    with trio.fail_after(60):
        second = await env.reaper().run_pass()
    assert second.dropped_roles == (bob.role,)
    assert second.dropped_groups == (group,)
    assert not role_exists(pg, group)


async def test_role_lock_held_by_another_instance_skips_the_role(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    creds = await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
    expire(pg, creds.role)
    other = Provisioner(env.listener, handshake_timeout=15.0)  # "another instance"
    try:
        lease = await other.lock_backend.acquire(creds.role, trio.current_time() + 10)
        try:
            with trio.fail_after(60):
                report = await env.reaper().run_pass()
        finally:
            await other.lock_backend.release(lease)
        assert report.dropped_roles == ()
        assert [(s.role, s.reason) for s in report.skipped] == [
            (creds.role, "busy: role lock held (being provisioned)")
        ]
        assert role_exists(pg, creds.role)
        # Once the lock is free, the next pass drops it.
        with trio.fail_after(60):
            later = await env.reaper().run_pass()
        assert later.dropped_roles == (creds.role,)
    finally:
        await other.aclose()


async def test_role_being_provisioned_in_this_process_is_skipped(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    creds = await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
    expire(pg, creds.role)
    async with env.prov.role_guard(creds.role):
        with trio.fail_after(60):
            report = await env.reaper(guard_wait=0.2).run_pass()
    assert report.dropped_roles == ()
    assert report.skipped[0].reason == "busy: being provisioned by this instance"
    assert role_exists(pg, creds.role)


async def test_failure_on_one_role_is_reported_and_the_pass_goes_on(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    g = grant(app_db, (Preset.READONLY, "public"))
    stuck = await env.provision(ALICE, g)
    fine = await env.provision(BOB, g)
    # ``stuck`` owns a table in a database the admin may not connect to: the reaper cannot
    # clean it there, so DROP ROLE is refused; it must say so and still drop ``fine``.
    locked_db = f"{app_db}_locked"
    pg.create_database(locked_db)
    try:
        pg.execute(f"REVOKE CONNECT ON DATABASE {identifier(locked_db)} FROM PUBLIC")
        pg.execute(
            f"CREATE TABLE public.hers (x int); ALTER TABLE public.hers OWNER TO "
            f"{identifier(stuck.role)}",
            dbname=locked_db,
        )
        expire(pg, stuck.role)
        expire(pg, fine.role)
        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.dropped_roles == (fine.role,)
        assert [f.role for f in report.failed] == [stuck.role]
        assert role_exists(pg, stuck.role) and not role_exists(pg, fine.role)
    finally:
        pg.drop_database(locked_db)


async def test_dry_run_reports_the_plan_and_changes_nothing(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    creds = await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
    group = naming.group_name(env.prefix, Preset.READONLY, "public", app_db)
    expire(pg, creds.role)
    with trio.fail_after(60):
        plan = await env.reaper().run_pass(dry_run=True)
    assert plan.dry_run
    assert plan.dropped_roles == (creds.role,)
    assert plan.dropped_groups == (group,)
    assert role_exists(pg, creds.role) and role_exists(pg, group)
    with trio.fail_after(60):
        done = await env.reaper().run_pass()
    assert (done.dropped_roles, done.dropped_groups) == (plan.dropped_roles, plan.dropped_groups)


async def test_list_roles_shows_identity_validity_sessions_and_groups(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    creds = await env.provision(ALICE, grant(app_db, (Preset.READONLY, "public")))
    group = naming.group_name(env.prefix, Preset.READONLY, "public", app_db)
    with trio.fail_after(60):
        listing = await env.reaper().list_roles()
    assert [r.name for r in listing.roles] == [creds.role]
    info = listing.roles[0]
    assert info.owner is not None and info.owner.login == ALICE.login
    assert info.owner.database == app_db and info.owner.listener == LISTENER
    assert info.valid_until is not None and not info.expired
    assert info.live_sessions == 0 and info.groups == (group,)
    assert [g.name for g in listing.groups] == [group]
    assert listing.groups[0].members == (creds.role,)
