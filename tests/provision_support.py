"""Shared set-up for the provisioning and reaper suites (both run on PostgreSQL 15 and 18)."""

from __future__ import annotations

from pgcluster import PgCluster


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
