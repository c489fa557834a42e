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
