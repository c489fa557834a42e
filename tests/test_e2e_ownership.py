"""The escalation chain through a running Waypoint, on PostgreSQL 15 and 18 with the
non-superuser admin: a caller who once held the admin preset (or, where ``public`` still lets
PUBLIC create, a readonly caller) leaves a SECURITY DEFINER function that runs any SQL. After
a downgrade (the next connection with a lowered grant) and after the reaper, that function
runs as the caller's own role with what that role holds then, never as the admin: the step
that matters (``CREATE ROLE``, ``GRANT <admin> TO self``) fails, and the caller's table keeps
its rows."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trio
from e2e_support import create_app_database, e2e_env
from pg8000.native import identifier
from pgcluster import PgCluster
from test_e2e_reaper import connect, current_user, short_ttl_env

from waypoint.grants import naming
from waypoint.identity.model import Identity

IDENT = Identity(login="stale@example.com", node="stale-node")

PWN = (
    "CREATE FUNCTION public.{name}(cmd text) RETURNS text LANGUAGE plpgsql SECURITY DEFINER "
    "SET search_path = pg_catalog AS $$BEGIN EXECUTE cmd; RETURN current_user; END$$"
)
_counter = itertools.count(1)


async def _run(conn: pg8000.native.Connection, sql: str) -> Any:
    return await trio.to_thread.run_sync(conn.run, sql)


async def _sqlstate(conn: pg8000.native.Connection, sql: str) -> str:
    try:
        await _run(conn, sql)
    except pg8000.native.DatabaseError as exc:
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        return str(fields.get("C"))
    raise AssertionError(f"{sql!r} succeeded")


async def _close(conn: pg8000.native.Connection) -> None:
    await trio.to_thread.run_sync(conn.close)


async def test_downgraded_callers_function_runs_as_the_caller_not_the_admin(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    admin = pg.admin_user
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path) as env:
            env.grant("127.0.0.2", {db: {"permissions": ["admin"]}})
            env.grant("127.0.0.3", {db: {"permissions": ["readonly"]}})
            conn = await env.pg8000_connect(db, source="127.0.0.2")
            try:
                role = await current_user(conn)
                await _run(conn, PWN.format(name="pwn"))
                await _run(conn, "CREATE TABLE public.mine (x int); INSERT INTO mine VALUES (1)")
            finally:
                await _close(conn)

            # Lowered to readonly: the next connection provisions the new grant.
            env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}})
            again = await env.pg8000_connect(db, source="127.0.0.2")
            other = await env.pg8000_connect(db, source="127.0.0.3")
            try:
                assert await current_user(again) == role
                assert await _run(again, "SELECT public.pwn('SELECT 1')") == [[role]]
                assert await _run(other, "SELECT public.pwn('SELECT 1')") == [[role]]
                backdoor = f"wp_backdoor_{os.getpid()}_{next(_counter)}"
                create = f"SELECT public.pwn('CREATE ROLE {backdoor} LOGIN CREATEROLE')"
                assert await _sqlstate(other, create) == "42501"
                me = identifier(await current_user(other))
                assert await _sqlstate(other, f"SELECT public.pwn('GRANT {admin} TO {me}')") == (
                    "42501"
                )
                write = "SELECT public.pwn('INSERT INTO public.t VALUES (2, ''x'')')"
                assert await _sqlstate(other, write) == "42501"
                assert await _run(again, "SELECT x FROM public.mine") == [[1]]
            finally:
                await _close(again)
                await _close(other)
            assert not pg.execute("SELECT 1 FROM pg_roles WHERE rolname = :r", r=backdoor)
            owner = pg.execute(
                "SELECT pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = 'pwn'",
                dbname=db,
            )
            assert owner == [[role]]
            await env.assert_clean()


async def test_reaped_callers_function_runs_as_a_retired_role_and_its_table_stays(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The reaper path, with the legacy ``public`` (CREATE to PUBLIC): an admin-preset caller
    and a readonly caller each leave a function; once reaped, both run as the retired role."""
    db = create_app_database(pg)
    pg.execute("GRANT CREATE ON SCHEMA public TO PUBLIC", dbname=db)
    prefix = f"o{os.getpid() % 100000}x{next(_counter)}_"
    async with short_ttl_env(pg, tmp_path, prefix) as env:
        env.grant("127.0.0.2", {db: {"permissions": ["admin"]}})
        env.grant("127.0.0.4", {db: {"permissions": ["readonly"]}})
        env.grant("127.0.0.3", {db: {"permissions": ["readonly"]}})
        owners: dict[str, str] = {}
        for source, name in (("127.0.0.2", "pwn"), ("127.0.0.4", "pwn_ro")):
            conn = await connect(env, db, source)
            try:
                owners[name] = await current_user(conn)
                await _run(conn, PWN.format(name=name))
                if name == "pwn":
                    await _run(conn, "CREATE TABLE public.mine (x int)")
                    await _run(conn, "INSERT INTO public.mine VALUES (1), (2)")
            finally:
                await _close(conn)

        def retired(role: str) -> bool:
            rows = pg.execute(
                "SELECT shobj_description(oid, 'pg_authid'), rolcanlogin FROM pg_roles "
                "WHERE rolname = :r",
                r=role,
            )
            return bool(rows) and naming.is_retired_comment(str(rows[0][0])) and not rows[0][1]

        # VALID UNTIL passes after 3 s; a pass runs every second.
        with trio.fail_after(30):
            while not all(retired(r) for r in owners.values()):
                await trio.sleep(0.25)

        other = await connect(env, db, "127.0.0.3")
        try:
            me = identifier(await current_user(other))
            for name, role in owners.items():
                assert await _run(other, f"SELECT public.{name}('SELECT 1')") == [[role]]
                create = f"SELECT public.{name}('CREATE ROLE wp_backdoor_{next(_counter)}')"
                assert await _sqlstate(other, create) == "42501"
                grant = f"SELECT public.{name}('GRANT {pg.admin_user} TO {me}')"
                assert await _sqlstate(other, grant) == "42501"
                # The retired role holds nothing: not even the readonly grant it once had.
                assert await _sqlstate(
                    other, f"SELECT public.{name}('SELECT 1 FROM public.t')"
                ) == ("42501")
        finally:
            await _close(other)
        assert pg.execute("SELECT x FROM public.mine ORDER BY x", dbname=db) == [[1], [2]]
        assert pg.execute(
            "SELECT tableowner FROM pg_tables WHERE tablename = 'mine'", dbname=db
        ) == [[owners["pwn"]]]

        # The same caller comes back: its own role, active again, its table still there.
        back = await connect(env, db, "127.0.0.2")
        try:
            assert await current_user(back) == owners["pwn"]
            assert await _run(back, "SELECT count(*) FROM public.mine") == [[2]]
        finally:
            await _close(back)


async def test_waypoint_refuses_to_start_with_a_privileged_reassign_to_and_says_why(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The catalog check at startup: a ``reassign_to`` that can log in refuses the start
    (the message says why), so nothing is ever reassigned to it; a stale role is left alone.
    A role that turns privileged later is refused by every pass (test_ownership_pg.py)."""
    from e2e_support import LISTENER, make_config_text, run_waypoint
    from localapi_standin import run_standin

    from waypoint.app import StartupRefused
    from waypoint.config.load import load_config_text

    keeper = f"keeper_{os.getpid()}_{next(_counter)}"
    pg.execute(f"CREATE ROLE {keeper} LOGIN")
    prefix = f"k{os.getpid() % 100000}x{next(_counter)}_"
    stale = f"{prefix}stale"
    pg.execute(f"CREATE ROLE {stale} LOGIN VALID UNTIL '2000-01-01'")
    pg.execute(f"COMMENT ON ROLE {stale} IS '{naming.role_comment(IDENT, LISTENER, 'postgres')}'")
    try:
        async with run_standin(tmp_path) as standin:
            text = make_config_text(
                pg,
                socket_path=standin.socket_path,
                postgres_extra=(
                    f'user_prefix = "{prefix}"\nreap_interval = "1s"\nreassign_to = "{keeper}"'
                ),
            )
            config = load_config_text(text, source="e2e-keeper.toml")
            with trio.fail_after(60), pytest.RaisesGroup(
                pytest.RaisesExc(StartupRefused, match=f"role '{keeper}' has LOGIN"),
                allow_unwrapped=True,
                flatten_subgroups=True,
            ):
                async with run_waypoint(config):
                    pytest.fail("Waypoint started with a reassign_to that can log in")
        assert pg.execute("SELECT 1 FROM pg_roles WHERE rolname = :r", r=stale) == [[1]]
    finally:
        pg.execute(f"DROP ROLE IF EXISTS {stale}")
        pg.execute(f"DROP ROLE {keeper}")
