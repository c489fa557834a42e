"""Attacks on identity, admission and pooling, on PostgreSQL 15 and 18 through a real Waypoint.

A pooled backend is handed out in place of a login as its role: the role is the caller's,
and the caller's cached secret and grant say the backend may be used. Whatever a caller (or
the caller's other instances, or another caller) does between a backend's keep and its
reuse must not let a session run with privileges its grant no longer gives, nor as another
caller's role. Every wait is bounded and polls.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import trio
from e2e_support import (
    LISTENER,
    create_app_database,
    db_rule,
    e2e_env,
    two_instances,
)
from pgcluster import PgCluster
from state_support import KeySpace
from test_e2e_cancel import assert_only_the_owner_cancels, cancel_outcomes
from test_e2e_pool import _psycopg, pid_and_role

from waypoint.app import Running

BOUND = 20.0
RW = {"permissions": ["readwrite"]}
RO = {"permissions": ["readonly"]}


async def via(running: Running, db: str, statements: list[str]) -> list[Any]:
    host, port = running.address(LISTENER)
    dsn = f"host={host} port={port} dbname={db} user=anyone sslmode=disable"
    return await trio.to_thread.run_sync(_psycopg, dsn, statements)


def grant_mallory(standin: Any, db: str, rights: dict[str, Any]) -> None:
    """Set the attacker's (127.0.0.1) grant on ``db`` in the LocalAPI stand-in."""
    standin.set_peer(
        "127.0.0.1", login="mallory@example.com", node="mallory-laptop", rules=[db_rule({db: rights})]
    )


async def wait_pooled(running: Running, count: int) -> None:
    with trio.fail_after(BOUND):
        while running._service is None or len(running._service.pool.book) != count:
            await trio.sleep(0.02)


async def test_a_backend_pooled_under_a_grant_is_not_reused_after_another_instance_changed_the_role(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    """readonly through A (its backend pooled there, A's cached secret set for readonly),
    then readwrite through B (B provisions the role: readwrite memberships, a new secret),
    then readonly again through A. A's cache still says "readonly, this caller", so without
    a check A hands its pooled backend over without a login: the role still holds B's
    readwrite memberships and the caller's INSERT lands with a readonly grant. The stale
    secret is what would have told A (a login with it fails): a pooled backend must not
    skip that."""
    db = create_app_database(pg)
    insert = "INSERT INTO public.t VALUES ({}, 'x')"
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, b):

        def grant(rights: dict[str, Any]) -> None:
            grant_mallory(standin, db, rights)

        grant(RO)
        role, pid = await via(a, db, ["SELECT current_user", "SELECT pg_catalog.pg_backend_pid()"])
        await wait_pooled(a, 1)

        grant(RW)
        role_b, written = await via(b, db, ["SELECT current_user", insert.format(11)])
        assert role_b == role and written is None

        grant(RO)
        role_a, pid_a, attack = await via(
            a,
            db,
            ["SELECT current_user", "SELECT pg_catalog.pg_backend_pid()", insert.format(12)],
        )
        assert role_a == role and pid_a != pid
        assert attack == "error:42501", "a readonly grant wrote through a pooled backend"
        rows = pg.execute("SELECT id FROM public.t WHERE id = 12", dbname=db)
        assert rows == []


async def test_an_extension_made_by_another_instance_costs_one_login_and_pooling_goes_on(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    """The check above must not end pooling between instances that extend each other's
    roles: after B extends the role's ``VALID UNTIL``, A logs in once with its cached secret
    (the server takes it: no provision ran), keeps the new ``VALID UNTIL`` and pools
    again."""
    db = create_app_database(pg)
    pid_query = "SELECT pg_catalog.pg_backend_pid()"
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, b):
        standin.set_peer(
            "127.0.0.1",
            login="mallory@example.com",
            node="mallory-laptop",
            rules=[db_rule({db: RO})],
        )
        role, first = await via(a, db, ["SELECT current_user", pid_query])
        await wait_pooled(a, 1)
        assert await via(a, db, [pid_query]) == [first]
        await wait_pooled(a, 1)

        await b.contexts[LISTENER].provisioner.extend_validity([role])
        (second,) = await via(a, db, [pid_query])
        assert second != first
        await wait_pooled(a, 1)
        assert await via(a, db, [pid_query]) == [second]


async def test_lookalike_tagged_nodes_get_their_own_roles_pooled_backends_and_cancels(
    pg: PgCluster, tmp_path: Path
) -> None:
    """Two tagged nodes share the login ``tagged-devices`` and a tag; one is shared in from
    another tailnet, so tailscaled names it by its full name (``db.other-tailnet.ts.net``),
    whose first label (``db``) is the other's name: both sanitize to the same role name.
    The marker keeps the node exactly, so the second gets a role of its own; neither is
    ever handed the other's pooled backend, and neither can cancel the other's statement
    with the right key."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        for ip, node in (("127.0.0.2", "db"), ("127.0.0.3", "db.other-tailnet.ts.net")):
            env.grant(ip, {db: RW}, login="tagged-devices", node=node, tags=["tag:db"])

        local = await pid_and_role(env, db, "127.0.0.2")
        await wait_pooled(env.running, 1)
        shared = await pid_and_role(env, db, "127.0.0.3")
        await wait_pooled(env.running, 2)
        assert local[1] != shared[1] and local[0] != shared[0]
        # The second is the first's name and a hash of its exact identity (the collision name).
        assert shared[1].startswith(local[1] + "_")
        for _ in range(2):
            # Each waits for the backend before it to be back in the pool (its reset runs
            # after the client has gone): a connection before that is a miss, a new backend.
            assert await pid_and_role(env, db, "127.0.0.3") == shared
            await wait_pooled(env.running, 2)
            assert await pid_and_role(env, db, "127.0.0.2") == local
            await wait_pooled(env.running, 2)

        await assert_only_the_owner_cancels(
            env, db, "127.0.0.2", "lookalike", ["127.0.0.3"], "127.0.0.2", pid=local[0]
        )
        assert cancel_outcomes(env) == {"wrong_identity": 1.0, "forwarded": 1.0}


async def test_a_caller_cannot_give_its_role_to_another_nor_rewrite_its_marker(
    pg: PgCluster, tmp_path: Path
) -> None:
    """Role names are public (``pg_roles``). A caller tries to make another caller's role a
    member of its own (``GRANT`` of its own role: before PostgreSQL 16 a role held ADMIN
    OPTION on itself), to rename its role, and to rewrite its ownership marker so that a
    lookalike's login resolves to it; the other caller then tries to act as the first."""
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.2", {db: RW}, login="mary.sue@example.com", node="laptop")
        env.grant("127.0.0.3", {db: RW}, login="mary_sue@example.com", node="laptop")

        async def run(source: str, statements: list[str]) -> list[Any]:
            conn = await env.pg8000_connect(db, source=source)
            out: list[Any] = []
            try:
                for statement in statements:
                    try:
                        rows = conn.run(statement)
                        out.append(rows[0][0] if rows else None)
                    except Exception as exc:
                        out.append(f"error:{getattr(exc, 'args', [{}])[0].get('C', exc)}")
            finally:
                conn.close()
            return out

        (mary_dot,) = await run("127.0.0.2", ["SELECT current_user"])
        (mary_under,) = await run("127.0.0.3", ["SELECT current_user"])
        assert mary_dot != mary_under
        marker = pg.execute(
            "SELECT pg_catalog.shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles"
            " WHERE rolname = :r",
            r=mary_dot,
        )[0][0]
        forged = str(marker).replace("mary.sue@", "mary_sue@")
        quoted = forged.replace("'", "''")
        attempts = await run(
            "127.0.0.2",
            [
                f'GRANT "{mary_dot}" TO "{mary_under}"',
                f"COMMENT ON ROLE \"{mary_dot}\" IS '{quoted}'",
                f'ALTER ROLE "{mary_dot}" RENAME TO "wp_taken_over"',
            ],
        )
        # The rename is refused as the session's own user (0A000) before any privilege check.
        assert attempts == ["error:42501", "error:42501", "error:0A000"], attempts
        assert await run("127.0.0.3", [f'ALTER ROLE "{mary_dot}" RENAME TO "wp_x"']) == [
            "error:42501"
        ]
        assert await run("127.0.0.3", [f'SET ROLE "{mary_dot}"']) == ["error:42501"]
        member = pg.execute(
            "SELECT pg_catalog.pg_has_role(:b, :a, 'MEMBER')", a=mary_dot, b=mary_under
        )
        assert member[0][0] is False


async def test_a_grant_raised_by_another_instances_revalidation_is_not_kept_by_a_cached_secret(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    """readonly: a session through B, then one through A (A provisions: its cached secret is
    the role's, set for readonly). readwrite: B's revalidation brings the role's memberships
    to readwrite for its live session, with no new secret. B's session ends; readonly again,
    through A: A's cache still says "readonly, this caller" and its secret still logs in, so
    the role's readwrite memberships must not be what the caller gets."""
    import pg8000.exceptions
    import pg8000.native

    from waypoint.proxy.revalidation import revalidate_once

    db = create_app_database(pg)
    insert = "INSERT INTO public.t VALUES ({}, 'x')"
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, b):

        def grant(rights: dict[str, Any]) -> None:
            grant_mallory(standin, db, rights)

        def connect_b() -> pg8000.native.Connection:
            host, port = b.address(LISTENER)
            return pg8000.native.Connection(
                user="anyone", host=host, port=port, database=db, timeout=30
            )

        grant(RO)
        held = await trio.to_thread.run_sync(connect_b)
        try:
            (role,) = await via(a, db, ["SELECT current_user"])
            grant(RW)
            await revalidate_once(b.contexts, b.registry)
        finally:
            # On 15 revalidation has ended it (readonly's group left for readwrite's).
            with contextlib.suppress(pg8000.exceptions.InterfaceError):
                held.close()
        grant(RO)
        role_a, attack = await via(a, db, ["SELECT current_user", insert.format(21)])
        assert role_a == role
        assert attack == "error:42501", "a readonly grant wrote with memberships set elsewhere"
