"""Shared set-up for the provisioning and reaper suites (both run on PostgreSQL 15 and 18)."""

from __future__ import annotations

from typing import Any

import pg8000.native
import trio
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster

from waypoint.provision.engine import Credentials


def setup_app_db(pg: PgCluster, db: str) -> None:
    """``app_owner`` owns schemas public and app, each with a table ``t`` (one row); the admin
    is a member of ``app_owner`` (docs/admin-privileges.md)."""
    pg.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_owner') "
        "THEN CREATE ROLE app_owner NOLOGIN; END IF; END $$"
    )
    pg.execute(f"GRANT app_owner TO {pg.admin_user}")
    pg.psql(
        "ALTER SCHEMA public OWNER TO app_owner;"
        "CREATE SCHEMA app AUTHORIZATION app_owner;"
        "SET ROLE app_owner;"
        "CREATE TABLE public.t (id serial PRIMARY KEY, v text);"
        "CREATE TABLE app.t (id serial PRIMARY KEY, v text);"
        "INSERT INTO public.t (v) VALUES ('p'); INSERT INTO app.t (v) VALUES ('a');",
        dbname=db,
    )


def role_exists(pg: PgCluster, role: str) -> bool:
    return bool(pg.execute("SELECT 1 FROM pg_roles WHERE rolname = :r", r=role))


def role_marker_login(pg: PgCluster, role: str) -> str | None:
    """The login the role's ownership marker names (None: no role, or no Waypoint marker)."""
    from waypoint.grants import naming

    rows = pg.execute(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = :r", r=role
    )
    if not rows:
        return None
    owner = naming.parse_role_comment(str(rows[0][0] or ""))
    return None if owner is None else owner.login


def connect_as(pg: PgCluster, creds: Credentials, db: str) -> pg8000.native.Connection:
    """A direct connection to ``db`` as the role ``creds`` name, with its secret."""
    return pg8000.native.Connection(
        user=creds.role, password=creds.secret, host=pg.host, port=pg.port, database=db, timeout=30
    )


async def run_as(pg: PgCluster, creds: Credentials, db: str, sql: str) -> list[list[Any]]:
    """The rows of ``sql`` run in ``db`` as the role ``creds`` name (a connection of its own)."""

    def go() -> list[list[Any]]:
        conn = connect_as(pg, creds, db)
        try:
            return [list(r) for r in conn.run(sql) or []]
        finally:
            conn.close()

    return await trio.to_thread.run_sync(go)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error pg8000 raised (None for anything else)."""
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        return str(exc.args[0].get("C"))
    return None
