"""What a caller's objects and code can do after its privileges shrink, on throwaway PostgreSQL
15 and 18 with the NON-superuser admin: a downgrade, a revocation (strip) and the reaper.

The attack: with the admin preset a caller creates a SECURITY DEFINER function that runs any
SQL it is given, a procedure, a view, a trigger on a table it does not own, a large object and
a table with rows. Nothing may ever be handed to the admin (or run as it): afterwards the code
runs as the caller's own role with the privileges it holds at that moment (after the reaper:
none), the trigger on the foreign table is gone, and the table keeps its rows.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_reaper_pg
import trio
from pg8000.exceptions import DatabaseError
from pg8000.native import identifier
from pgcluster import PgCluster
from provision_support import role_exists, run_as, setup_app_db, sqlstate
from test_reaper_pg import ALICE, BOB, Env, expire, grant, listener_for, new_prefix

from waypoint.config.model import ListenerConfig
from waypoint.grants import naming
from waypoint.grants.model import Preset
from waypoint.provision.engine import Credentials, ProvisionError
from waypoint.reaper import ReapError, ReapReport

RO, ADM = Preset.READONLY, Preset.ADMIN

# What an admin-preset caller leaves behind (the escalation chain and its relatives).
PLANT = """
CREATE FUNCTION public.pwn(cmd text) RETURNS text LANGUAGE plpgsql SECURITY DEFINER
  SET search_path = pg_catalog AS $$BEGIN EXECUTE cmd; RETURN current_user; END$$;
CREATE PROCEDURE public.proc(cmd text) LANGUAGE plpgsql SECURITY DEFINER
  SET search_path = pg_catalog AS $$BEGIN EXECUTE cmd; END$$;
CREATE VIEW public.peek AS SELECT v FROM app.t;
GRANT SELECT ON public.peek TO PUBLIC;
CREATE TABLE public.mine (x int);
INSERT INTO public.mine VALUES (1), (2), (3);
CREATE TABLE public.seen (who text);
GRANT INSERT ON public.seen TO PUBLIC;
CREATE FUNCTION public.trap() RETURNS trigger LANGUAGE plpgsql
  SET search_path = pg_catalog AS $$BEGIN INSERT INTO public.seen VALUES (current_user);
  RETURN NEW; END$$;
CREATE TRIGGER trap AFTER INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION public.trap();
SELECT pg_catalog.lo_from_bytea(4242, 'caller data');
"""

OWNERS = """
SELECT 'pwn', pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = 'pwn'
UNION ALL SELECT 'proc', pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = 'proc'
UNION ALL SELECT 'peek', pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = 'peek'
UNION ALL SELECT 'mine', pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = 'mine'
UNION ALL SELECT 'lo', pg_get_userbyid(lomowner)::text FROM pg_largeobject_metadata
  WHERE oid = 4242
ORDER BY 1
"""


async def sqlstate_of(pg: PgCluster, creds: Credentials, db: str, sql: str) -> str:
    """The SQLSTATE ``sql`` fails with as the role of ``creds`` (fails the test if it works)."""
    try:
        await run_as(pg, creds, db, sql)
    except DatabaseError as exc:
        return str(sqlstate(exc))
    raise AssertionError(f"{sql!r} succeeded as {creds.role}")


def members_of(pg: PgCluster, role: str) -> list[str]:
    rows = pg.execute(
        "SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
        "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = :r ORDER BY 1",
        r=role,
    )
    return [str(r[0]) for r in rows]


def triggers_on_t(pg: PgCluster, db: str) -> list[str]:
    rows = pg.execute(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'public.t'::regclass "
        "AND NOT tgisinternal",
        dbname=db,
    )
    return [str(r[0]) for r in rows]


app_db = test_reaper_pg.app_db
env = test_reaper_pg.env


async def _plant(pg: PgCluster, env: Env, db: str) -> tuple[Credentials, Credentials]:
    """ALICE (admin on public, readonly on app) plants everything; BOB reads public."""
    alice = await env.provision(ALICE, grant(db, (ADM, "public"), (RO, "app")))
    await run_as(pg, alice, db, PLANT)
    bob = await env.provision(BOB, grant(db, (RO, "public")))
    # The trap fires as whoever writes public.t (here the superuser): what must end.
    pg.execute("INSERT INTO public.t (v) VALUES ('before')", dbname=db)
    assert pg.execute("SELECT who FROM public.seen", dbname=db) == [["postgres"]]
    # Before: the function runs as alice's role, with alice's (admin-preset) privileges.
    assert await run_as(pg, bob, db, "SELECT public.pwn('SELECT 1')") == [[alice.role]]
    return alice, bob


async def _shrink(
    path: str, pg: PgCluster, env: Env, db: str, alice: Credentials
) -> ReapReport | None:
    """Shrink alice's privileges by ``path``: a downgrade to readonly, a revocation, or her
    role expiring and a reaper pass (whose report is returned)."""
    if path == "downgrade":
        await env.prov.reconcile(ALICE, grant(db, (RO, "public")))
    elif path == "revocation":
        await env.prov.strip(alice.role)
    else:
        expire(pg, alice.role)
        with trio.fail_after(60):
            return await env.reaper().run_pass()
    return None


@pytest.mark.parametrize("path", ["downgrade", "revocation", "reap"])
async def test_caller_code_and_objects_after_privileges_shrink(
    pg: PgCluster, app_db: str, env: Env, path: str
) -> None:
    db = app_db
    alice, bob = await _plant(pg, env, db)
    report = await _shrink(path, pg, env, db, alice)
    if report is not None:
        assert report.retired_roles == (alice.role,), report
        assert report.dropped_roles == () and report.failed == (), report

    # Owner: still alice's own role, never the admin.
    assert pg.execute(OWNERS, dbname=db) == [
        ["lo", alice.role],
        ["mine", alice.role],
        ["peek", alice.role],
        ["proc", alice.role],
        ["pwn", alice.role],
    ]
    # SECURITY DEFINER function: runs as alice's role, which cannot escalate.
    assert await run_as(pg, bob, db, "SELECT public.pwn('SELECT 1')") == [[alice.role]]
    assert pg.execute("SELECT public.pwn('SELECT 1')", dbname=db) == [[alice.role]]
    grant_self = f"SELECT public.pwn('GRANT app_owner TO {identifier(bob.role)}')"
    assert await sqlstate_of(pg, bob, db, grant_self) == "42501"
    assert "app_owner" not in members_of(pg, bob.role)
    assert await sqlstate_of(pg, bob, db, "SELECT public.pwn('CREATE ROLE wp_backdoor')") == "42501"
    assert not role_exists(pg, "wp_backdoor")
    insert = "INSERT INTO public.t (v) VALUES (''pwned'')"
    assert await sqlstate_of(pg, bob, db, f"SELECT public.pwn('{insert}')") == "42501"
    # SECURITY DEFINER procedure: the same.
    assert await sqlstate_of(pg, bob, db, f"CALL public.proc('{insert}')") == "42501"
    # View: reads with its owner's privileges, and alice lost app.
    assert await sqlstate_of(pg, bob, db, "SELECT * FROM public.peek") == "42501"
    # Trigger on a table alice does not own: gone, and a write no longer runs alice's code.
    assert triggers_on_t(pg, db) == []
    assert pg.execute("SELECT count(*) FROM pg_proc WHERE proname = 'trap'", dbname=db) == [[0]]
    pg.execute("INSERT INTO public.t (v) VALUES ('after')", dbname=db)
    assert pg.execute("SELECT who FROM public.seen", dbname=db) == [["postgres"]]
    # Table with data: still there, rows intact.
    assert pg.execute("SELECT x FROM public.mine ORDER BY x", dbname=db) == [[1], [2], [3]]
    assert pg.execute("SELECT count(*) FROM public.t WHERE v = 'pwned'", dbname=db) == [[0]]

    ro_group = naming.group_name(env.prefix, RO, "public", db)
    if path == "downgrade":
        assert members_of(pg, alice.role) == [ro_group]
    else:
        assert members_of(pg, alice.role) == []
    if path == "reap":
        row = pg.execute(
            "SELECT rolcanlogin, rolpassword IS NULL, rolvaliduntil < now(), "
            "shobj_description(oid, 'pg_authid') FROM pg_authid WHERE rolname = :r",
            r=alice.role,
        )
        assert row[0][:3] == [False, True, True]
        assert naming.is_retired_comment(row[0][3])
        assert naming.parse_role_comment(row[0][3]) == naming.role_owner(ALICE, "pg-main", db)
        # The retired role reads nothing it was granted: its code can read only its own.
        assert await sqlstate_of(pg, bob, db, "SELECT public.pwn('SELECT 1 FROM public.t')") == (
            "42501"
        )


async def test_downgrade_by_a_new_provision_keeps_objects_and_drops_foreign_trigger(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """The downgrade a reconnect runs (a new grant at the next handshake), not revalidation's."""
    db = app_db
    alice, _bob = await _plant(pg, env, db)
    again = await env.provision(ALICE, grant(db, (RO, "public")))
    assert again.provisioned and again.role == alice.role
    assert await run_as(pg, again, db, "SELECT public.pwn('SELECT 1')") == [[alice.role]]
    assert await sqlstate_of(pg, again, db, "SELECT public.pwn('CREATE ROLE wp_backdoor')") == (
        "42501"
    )
    assert triggers_on_t(pg, db) == []
    assert pg.execute(OWNERS, dbname=db)[1] == ["mine", alice.role]


async def test_downgrade_keeps_a_trigger_where_the_role_still_may_have_it(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """Only triggers on tables where the role lost TRIGGER go; admin on public stays."""
    db = app_db
    alice = await env.provision(ALICE, grant(db, (ADM, "public"), (ADM, "app")))
    await run_as(pg, alice, db, PLANT)
    await env.prov.reconcile(ALICE, grant(db, (ADM, "public")))
    assert triggers_on_t(pg, db) == ["trap"]
    await env.prov.reconcile(ALICE, grant(db, (RO, "public")))
    assert triggers_on_t(pg, db) == []


async def test_legacy_public_schema_readonly_caller_cannot_escalate_through_reaper(
    pg: PgCluster, pg_db: str, env: Env
) -> None:
    """A database whose ``public`` still lets PUBLIC create: a readonly caller's function."""
    db = pg_db
    setup_app_db(pg, db)
    pg.execute("GRANT CREATE ON SCHEMA public TO PUBLIC", dbname=db)
    mallory = await env.provision(ALICE, grant(db, (RO, "public")))
    await run_as(
        pg,
        mallory,
        db,
        "CREATE FUNCTION public.pwn(cmd text) RETURNS text LANGUAGE plpgsql SECURITY DEFINER "
        "SET search_path = pg_catalog AS $$BEGIN EXECUTE cmd; RETURN current_user; END$$",
    )
    bob = await env.provision(BOB, grant(db, (RO, "public")))
    expire(pg, mallory.role)
    with trio.fail_after(60):
        report = await env.reaper().run_pass()
    assert report.retired_roles == (mallory.role,), report
    assert await run_as(pg, bob, db, "SELECT public.pwn('SELECT 1')") == [[mallory.role]]
    grant_self = f"SELECT public.pwn('GRANT app_owner TO {identifier(bob.role)}')"
    assert await sqlstate_of(pg, bob, db, grant_self) == "42501"
    assert await sqlstate_of(pg, bob, db, "SELECT public.pwn('CREATE ROLE wp_backdoor')") == "42501"
    assert "app_owner" not in members_of(pg, bob.role)


async def test_role_owning_only_a_large_object_is_retired_not_dropped(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """A readonly caller may create large objects: they count as owned; the role is retired."""
    db = app_db
    ro = await env.provision(ALICE, grant(db, (RO, "public")))
    await run_as(pg, ro, db, "SELECT pg_catalog.lo_from_bytea(4343, 'kept')")
    expire(pg, ro.role)
    with trio.fail_after(60):
        report = await env.reaper().run_pass()
    assert report.retired_roles == (ro.role,) and report.dropped_roles == (), report
    assert pg.execute(
        "SELECT pg_get_userbyid(lomowner)::text FROM pg_largeobject_metadata WHERE oid = 4343",
        dbname=db,
    ) == [[ro.role]]
    assert pg.execute("SELECT convert_from(lo_get(4343), 'UTF8')", dbname=db) == [["kept"]]


async def test_retired_role_is_left_alone_then_dropped_once_it_owns_nothing(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    db = app_db
    alice = await env.provision(ALICE, grant(db, (ADM, "public")))
    await run_as(
        pg, alice, db, "CREATE TABLE public.mine (x int); INSERT INTO public.mine VALUES (5)"
    )
    expire(pg, alice.role)
    with trio.fail_after(60):
        first = await env.reaper().run_pass()
    assert first.retired_roles == (alice.role,), first
    with trio.fail_after(60):
        second = await env.reaper().run_pass()
    assert (second.retired_roles, second.dropped_roles, second.skipped) == ((), (), ()), second
    assert role_exists(pg, alice.role)
    with trio.fail_after(60):
        listing = await env.reaper().list_roles()
        owned = await env.reaper().owned_summary()
    (info,) = listing.roles
    assert info.retired and info.owned >= 1
    assert [(o.role, o.database, o.kind) for o in owned if o.kind == "relations"] == [
        (alice.role, db, "relations")
    ]

    pg.execute("DROP TABLE public.mine", dbname=db)  # the operator cleans up
    with trio.fail_after(60):
        third = await env.reaper().run_pass()
    assert third.dropped_roles == (alice.role,), third
    assert not role_exists(pg, alice.role)


async def test_same_caller_reactivates_its_retired_role(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    db = app_db
    g = grant(db, (ADM, "public"))
    alice = await env.provision(ALICE, g)
    await run_as(
        pg, alice, db, "CREATE TABLE public.mine (x int); INSERT INTO public.mine VALUES (5)"
    )
    expire(pg, alice.role)
    env.prov.forget(alice.role)
    with trio.fail_after(60):
        report = await env.reaper().run_pass()
    assert report.retired_roles == (alice.role,)

    back = await env.provision(ALICE, g)
    assert back.provisioned and back.role == alice.role
    assert await run_as(pg, back, db, "SELECT x FROM public.mine") == [[5]]
    row = pg.execute(
        "SELECT rolcanlogin, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = :r",
        r=alice.role,
    )
    assert row[0][0] is True and not naming.is_retired_comment(row[0][1])
    assert naming.parse_role_comment(row[0][1]) == naming.role_owner(ALICE, "pg-main", db)


async def test_reconcile_does_not_reactivate_a_retired_role(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """Only a new provision (with a new secret) brings a retired role back."""
    db = app_db
    alice = await env.provision(ALICE, grant(db, (ADM, "public")))
    await run_as(pg, alice, db, "CREATE TABLE public.mine (x int)")
    expire(pg, alice.role)
    with trio.fail_after(60):
        await env.reaper().run_pass()
    with pytest.raises(ProvisionError):
        await env.prov.reconcile(ALICE, grant(db, (ADM, "public")))
    assert members_of(pg, alice.role) == []


# -- reassign_to ------------------------------------------------------------------------


async def _reaper_env(pg: PgCluster, **pgopts: Any) -> tuple[Env, ListenerConfig]:
    prefix = new_prefix()
    listener = listener_for(pg, prefix, **pgopts)
    return Env(pg, prefix, listener), listener


@pytest.mark.parametrize(
    ("attrs", "why"),
    [
        ("LOGIN", "has LOGIN"),
        ("NOLOGIN CREATEROLE", "has CREATEROLE"),
        ("NOLOGIN BYPASSRLS", "has BYPASSRLS"),
        ("NOLOGIN REPLICATION", "has REPLICATION"),
        ("NOLOGIN CREATEDB", "has CREATEDB"),
        ("NOLOGIN IN ROLE app_owner", "is a member of app_owner"),
    ],
)
async def test_reassign_to_with_privileges_is_refused_and_nothing_is_reaped(
    pg: PgCluster, app_db: str, attrs: str, why: str
) -> None:
    target = f"{new_prefix()}keeper"
    pg.execute(f"CREATE ROLE {identifier(target)} {attrs}")
    pg.execute(f"GRANT {identifier(target)} TO {pg.admin_user}")
    env, _ = await _reaper_env(pg, reassign_to=target)
    try:
        alice = await env.provision(ALICE, grant(app_db, (ADM, "public"), (RO, "app")))
        await run_as(pg, alice, app_db, PLANT)
        assert why in (await env.reaper().check_reassign_to() or "")
        expire(pg, alice.role)
        with trio.fail_after(60), pytest.raises(ReapError) as info:
            await env.reaper().run_pass()
        assert why in str(info.value) and "reassign_to refused" in str(info.value)
        assert "NOLOGIN role with none of SUPERUSER" in str(info.value)
        assert role_exists(pg, alice.role) and members_of(pg, alice.role) != []
        assert pg.execute(OWNERS, dbname=app_db)[1] == ["mine", alice.role]
    finally:
        await env.prov.aclose()
        pg.execute(f"DROP ROLE {identifier(target)}")


async def test_reassign_to_missing_role_is_refused(pg: PgCluster) -> None:
    env, _ = await _reaper_env(pg, reassign_to="no_such_keeper_role")
    try:
        assert await env.reaper().check_reassign_to() == "role 'no_such_keeper_role' does not exist"
    finally:
        await env.prov.aclose()


async def test_reassign_to_receives_objects_whose_code_then_runs_as_its_caller(
    pg: PgCluster, app_db: str
) -> None:
    """A checked reassign_to gets the objects; the code first loses its definer rights and the
    foreign-table trigger is dropped, so nothing runs as reassign_to."""
    target = f"{new_prefix()}keeper"
    pg.execute(f"CREATE ROLE {identifier(target)} NOLOGIN")
    pg.execute(f"GRANT {identifier(target)} TO {pg.admin_user}")
    # A new owner needs CREATE on the schema of what it receives (docs/operations.md).
    pg.execute(f"GRANT CREATE ON SCHEMA public TO {identifier(target)}", dbname=app_db)
    env, _ = await _reaper_env(pg, reassign_to=target)
    try:
        alice = await env.provision(ALICE, grant(app_db, (ADM, "public"), (RO, "app")))
        await run_as(pg, alice, app_db, PLANT)
        bob = await env.provision(BOB, grant(app_db, (RO, "public")))
        expire(pg, alice.role)
        with trio.fail_after(60):
            report = await env.reaper().run_pass()
        assert report.dropped_roles == (alice.role,), report
        assert not role_exists(pg, alice.role)
        owners = pg.execute(OWNERS, dbname=app_db)
        assert owners == [[k, target] for k in ("lo", "mine", "peek", "proc", "pwn")]
        assert pg.execute("SELECT x FROM public.mine ORDER BY x", dbname=app_db) == [[1], [2], [3]]
        # SECURITY INVOKER now: it runs as whoever calls it.
        assert await run_as(pg, bob, app_db, "SELECT public.pwn('SELECT 1')") == [[bob.role]]
        assert pg.execute(
            "SELECT bool_or(prosecdef) FROM pg_proc WHERE proname IN ('pwn', 'proc')",
            dbname=app_db,
        ) == [[False]]
        assert await sqlstate_of(pg, bob, app_db, "SELECT * FROM public.peek") == "42501"
        assert triggers_on_t(pg, app_db) == []
    finally:
        await env.prov.aclose()
        pg.execute(f"DROP OWNED BY {identifier(target)}", dbname=app_db)
        pg.execute(f"DROP ROLE {identifier(target)}")


# -- code owned by a shared group -------------------------------------------------------

GROUP_PLANT = """
CREATE FUNCTION public.gpwn(cmd text) RETURNS text LANGUAGE plpgsql SECURITY DEFINER
  SET search_path = pg_catalog AS $$BEGIN EXECUTE cmd; RETURN current_user; END$$;
CREATE VIEW public.gpeek AS SELECT v FROM public.t;
GRANT SELECT ON public.gpeek TO PUBLIC;
CREATE FUNCTION public.gtrap() RETURNS trigger LANGUAGE plpgsql
  SET search_path = pg_catalog AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER gtrap AFTER INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION public.gtrap();
"""


def server_major(pg: PgCluster) -> int:
    return int(str(pg.execute("SHOW server_version_num")[0][0])) // 10000


async def test_member_cannot_set_role_to_its_group_on_16_and_later(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """16+: memberships are granted WITH SET FALSE, so a group never owns a caller's code."""
    alice = await env.provision(ALICE, grant(app_db, (ADM, "public")))
    group = naming.group_name(env.prefix, ADM, "public", app_db)
    if server_major(pg) < 16:
        await run_as(pg, alice, app_db, f"SET ROLE {identifier(group)}")  # 15: allowed
        return
    assert await sqlstate_of(pg, alice, app_db, f"SET ROLE {identifier(group)}") == "42501"
    # ... while the privileges still come through inheritance.
    await run_as(pg, alice, app_db, "INSERT INTO public.t (v) VALUES ('inherited')")


@pytest.mark.parametrize("path", ["downgrade", "revocation", "reap"])
async def test_group_code_is_disarmed_when_a_member_leaves(pg15: PgCluster, path: str) -> None:
    """15 has no SET option: a member can SET ROLE to its group and leave code the group owns
    (which runs with the group's privileges for anyone). Once a member leaves, that code runs
    as its callers and the group's trigger on a foreign table is gone."""
    pg = pg15
    db = f"own_{path}_{new_prefix()}".rstrip("_")
    pg.create_database(db)
    prefix = new_prefix()
    env = Env(pg, prefix, listener_for(pg, prefix))
    try:
        setup_app_db(pg, db)
        alice = await env.provision(ALICE, grant(db, (ADM, "public")))
        group = naming.group_name(prefix, ADM, "public", db)
        await run_as(pg, alice, db, f"SET ROLE {identifier(group)};" + GROUP_PLANT)
        bob = await env.provision(BOB, grant(db, (RO, "public")))
        assert await run_as(pg, bob, db, "SELECT public.gpwn('SELECT 1')") == [[group]]

        report = await _shrink(path, pg, env, db, alice)
        if report is not None:
            assert report.dropped_roles == (alice.role,), report  # alice herself owns nothing
            assert [s.role for s in report.skipped] == [group], report
            assert "kept" in report.skipped[0].reason

        assert await run_as(pg, bob, db, "SELECT public.gpwn('SELECT 1')") == [[bob.role]]
        insert = "INSERT INTO public.t (v) VALUES (''pwned'')"
        assert await sqlstate_of(pg, bob, db, f"SELECT public.gpwn('{insert}')") == "42501"
        assert pg.execute("SELECT reloptions FROM pg_class WHERE relname = 'gpeek'", dbname=db) == [
            [["security_invoker=true"]]
        ]
        assert triggers_on_t(pg, db) == []
        assert pg.execute(
            "SELECT pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = 'gpwn'",
            dbname=db,
        ) == [[group]]  # never the admin's
    finally:
        await env.prov.aclose()
        pg.drop_database(db)


async def test_role_with_only_default_privileges_is_dropped_not_retired(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """``ALTER DEFAULT PRIVILEGES`` leaves a setting, not an object: nothing to keep."""
    ro = await env.provision(ALICE, grant(app_db, (RO, "public")))
    await run_as(pg, ro, app_db, "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC")
    expire(pg, ro.role)
    with trio.fail_after(60):
        report = await env.reaper().run_pass()
    assert report.dropped_roles == (ro.role,) and report.retired_roles == (), report
    assert not role_exists(pg, ro.role)


async def test_membership_the_admin_cannot_revoke_fails_the_retirement_loudly(
    pg: PgCluster, app_db: str, env: Env
) -> None:
    """16+: a membership the superuser granted is not the admin's to revoke. The rest of the
    retirement holds (NOLOGIN, Waypoint's groups gone), the role is not marked retired, and
    the pass says why; once the operator revokes it, the next pass finishes."""
    alice = await env.provision(ALICE, grant(app_db, (ADM, "public")))
    await run_as(pg, alice, app_db, "CREATE TABLE public.mine (x int)")
    pg.execute(f"GRANT app_owner TO {identifier(alice.role)}")  # by the superuser
    expire(pg, alice.role)
    with trio.fail_after(60):
        report = await env.reaper().run_pass()
    if server_major(pg) < 16:  # 15: CREATEROLE revokes any membership
        assert report.retired_roles == (alice.role,), report
        assert members_of(pg, alice.role) == []
        return
    assert [f.role for f in report.failed] == [alice.role], report
    assert "app_owner to " in report.failed[0].reason
    assert members_of(pg, alice.role) == ["app_owner"]
    row = pg.execute(
        "SELECT rolcanlogin, shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = :r",
        r=alice.role,
    )
    assert row[0][0] is False and not naming.is_retired_comment(row[0][1])

    pg.execute(f"REVOKE app_owner FROM {identifier(alice.role)}")
    with trio.fail_after(60):
        again = await env.reaper().run_pass()
    assert again.retired_roles == (alice.role,), again
