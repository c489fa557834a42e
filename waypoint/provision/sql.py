"""SQL text for provisioning: pure functions, no I/O.

DDL takes no bind parameters, so every identifier goes through
``pg8000.native.identifier()`` (always double-quoted) and every literal
through ``pg8000.native.literal()``. Catalog queries are schema-qualified
(admin sessions pin ``search_path = pg_catalog, pg_temp``) and take
parameters (``:name`` placeholders of ``pg8000.native``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

from pg8000.native import identifier, literal

from waypoint.grants.model import Preset

ROLE_LOCK_CLASS: Final = 1
GROUP_LOCK_CLASS: Final = 2

# Relation kinds whose appearance changes what ``ON ALL TABLES/SEQUENCES IN SCHEMA`` covers.
_RELKINDS: Final = "('r','p','v','m','f','S')"


def lock_key(*parts: str) -> int:
    """A signed 32-bit advisory-lock key from the exact parts (NUL-separated)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int(struct.unpack(">i", digest[:4])[0])


def role_lock_key(role: str) -> int:
    return lock_key(role)


def group_lock_key(database: str, schema: str) -> int:
    return lock_key(database, schema)


def timestamp_literal(ts: datetime) -> str:
    """``'2026-01-02 03:04:05.678901+00'`` for ``VALID UNTIL`` (computed by Waypoint, UTC)."""
    if ts.tzinfo is None:
        raise ValueError("VALID UNTIL needs an aware datetime")
    text = ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return str(literal(text))


def preset_grants(preset: Preset, schema: str, grantee: str) -> list[str]:
    """The presets' table (docs/policy.md): what a group of ``preset`` gets on schema ``schema``."""
    s = identifier(schema)
    g = identifier(grantee)
    if preset == Preset.READONLY:
        return [
            f"GRANT USAGE ON SCHEMA {s} TO {g}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {g}",
            f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {g}",
        ]
    if preset == Preset.READWRITE:
        return [
            *preset_grants(Preset.READONLY, schema, grantee),
            f"GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {g}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {g}",
        ]
    if preset == Preset.ADMIN:
        return [
            f"GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA {s} TO {g}",
            f"GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA {s} TO {g}",
            f"GRANT USAGE, CREATE ON SCHEMA {s} TO {g}",
        ]
    raise ValueError(f"unknown preset {preset!r}")


def create_group(group: str, database: str, comment: str) -> list[str]:
    """A shared NOLOGIN group: its marker, and CONNECT on its database (granted once, here)."""
    g = identifier(group)
    return [
        f"CREATE ROLE {g} NOLOGIN",
        f"COMMENT ON ROLE {g} IS {literal(comment)}",
        f"GRANT CONNECT ON DATABASE {identifier(database)} TO {g}",
    ]


def create_login_role(role: str, verifier: str, valid_until: datetime) -> str:
    return (
        f"CREATE ROLE {identifier(role)} LOGIN INHERIT NOCREATEDB NOCREATEROLE NOREPLICATION "
        f"PASSWORD {literal(verifier)} VALID UNTIL {timestamp_literal(valid_until)}"
    )


def set_password(role: str, verifier: str, valid_until: datetime) -> str:
    """A new secret; ``LOGIN`` again too (a retired role coming back to its own caller)."""
    return (
        f"ALTER ROLE {identifier(role)} LOGIN PASSWORD {literal(verifier)} "
        f"VALID UNTIL {timestamp_literal(valid_until)}"
    )


def set_valid_until(role: str, valid_until: datetime) -> str:
    return f"ALTER ROLE {identifier(role)} VALID UNTIL {timestamp_literal(valid_until)}"


def set_role_setting(role: str, name: str, value: str) -> str:
    """``ALTER ROLE r SET name = 'value'`` (the role's default for new sessions)."""
    return f"ALTER ROLE {identifier(role)} SET {identifier(name)} = {literal(value)}"


def comment_on_role(role: str, comment: str) -> str:
    return f"COMMENT ON ROLE {identifier(role)} IS {literal(comment)}"


def grant_role_to_admin(role: str, inherit_clause: str) -> str:
    """15: ``GRANT r TO CURRENT_USER``; 16+: ``... WITH INHERIT TRUE`` (for REASSIGN/DROP OWNED)."""
    return f"GRANT {identifier(role)} TO CURRENT_USER{inherit_clause}"


def grant_membership(group: str, role: str, member_clause: str = "") -> str:
    """``GRANT g TO r``; ``member_clause`` the dialect's (16+: no SET to the group)."""
    return f"GRANT {identifier(group)} TO {identifier(role)}{member_clause}"


def revoke_membership(group: str, role: str) -> str:
    return f"REVOKE {identifier(group)} FROM {identifier(role)}"


def drop_function_cascade(signature: str) -> str:
    """``DROP FUNCTION <f>(<args>) CASCADE``. ``signature`` is the server's own
    ``regprocedure`` output (names quoted and schema-qualified by the server, the admin's
    ``search_path`` being pinned to ``pg_catalog, pg_temp``), never caller text."""
    return f"DROP FUNCTION {signature} CASCADE"


def make_invoker(signature: str) -> str:
    """``ALTER ROUTINE <f>(<args>) SECURITY INVOKER``; ``signature`` is the server's own
    ``regprocedure`` output, never caller text."""
    return f"ALTER ROUTINE {signature} SECURITY INVOKER"


def view_as_invoker(schema: str, view: str) -> str:
    return f"ALTER VIEW {identifier(schema)}.{identifier(view)} SET (security_invoker = true)"


def drop_rule(schema: str, table: str, rule: str) -> str:
    return f"DROP RULE {identifier(rule)} ON {identifier(schema)}.{identifier(table)}"


# Catalog queries (parameters with pg8000.native's :name style).

ROLES_QUERY: Final = (
    "SELECT r.rolname, pg_catalog.shobj_description(r.oid, 'pg_authid'), r.rolcanlogin "
    "FROM pg_catalog.pg_roles AS r WHERE r.rolname = ANY(CAST(:names AS pg_catalog.text[]))"
)

MEMBERSHIPS_QUERY: Final = (
    "SELECT g.rolname, pg_catalog.shobj_description(g.oid, 'pg_authid') "
    "FROM pg_catalog.pg_auth_members AS m "
    "JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid "
    "JOIN pg_catalog.pg_roles AS u ON u.oid = m.member "
    "WHERE u.rolname = :role"
)

# Trigger functions the role owns that fire on a table the role does not own, in the current
# database: code the role wrote that runs as whoever writes to someone else's table (a
# superuser included). With :lost true, only those on tables where the role no longer has the
# TRIGGER privilege (after a downgrade's REVOKEs in the same transaction). A function
# returning ``trigger`` cannot be called from SQL, so triggers are its only dependents and
# ``DROP FUNCTION ... CASCADE`` removes exactly those triggers; it needs the privileges of the
# function's owner only (the admin is a member of every role it created), not of the tables.
FOREIGN_TRIGGER_FUNCTIONS_QUERY: Final = (
    "SELECT DISTINCT p.oid::pg_catalog.regprocedure::pg_catalog.text "
    "FROM pg_catalog.pg_trigger AS t "
    "JOIN pg_catalog.pg_proc AS p ON p.oid = t.tgfoid "
    "JOIN pg_catalog.pg_class AS c ON c.oid = t.tgrelid "
    "JOIN pg_catalog.pg_roles AS r ON r.oid = p.proowner "
    "WHERE r.rolname = :role AND c.relowner <> p.proowner "
    "AND (NOT CAST(:lost AS pg_catalog.bool) "
    " OR NOT pg_catalog.has_table_privilege(r.oid, c.oid, 'TRIGGER')) "
    "ORDER BY 1"
)

# Connectable databases where the role owns objects (``pg_shdepend`` owner rows, a shared
# catalog: large objects, functions, relations, types, schemas, default privileges ...).
OWNED_DATABASES_QUERY: Final = (
    "SELECT DISTINCT d.datname::pg_catalog.text "
    "FROM pg_catalog.pg_shdepend AS s "
    "JOIN pg_catalog.pg_database AS d ON d.oid = s.dbid "
    "WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass AND s.deptype = 'o' "
    "AND s.refobjid = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = :role) "
    "AND d.datallowconn "
    "ORDER BY 1"
)

# Code a role owns in the current database that runs with its owner's privileges whoever
# calls it: SECURITY DEFINER functions and procedures, views (unless security_invoker, which
# PostgreSQL has from 15 on), and rules on its tables other than a view's own ``_RETURN``.
# Disarmed (:func:`waypoint.provision.disarm.disarm_code`) before such code could run with
# privileges its author does not hold: a Waypoint group's (created by a member after SET
# ROLE) when a member leaves it, a reaped role's before its objects go to ``reassign_to``.
DEFINER_ROUTINES_QUERY: Final = (
    "SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text FROM pg_catalog.pg_proc AS p "
    "JOIN pg_catalog.pg_roles AS r ON r.oid = p.proowner "
    "WHERE r.rolname = :role AND p.prosecdef ORDER BY 1"
)
OWNED_VIEWS_QUERY: Final = (
    "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text "
    "FROM pg_catalog.pg_class AS c "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
    "JOIN pg_catalog.pg_roles AS r ON r.oid = c.relowner "
    "WHERE r.rolname = :role AND c.relkind = 'v' "
    "AND pg_catalog.current_setting('server_version_num')::pg_catalog.int4 >= 150000 "
    "ORDER BY 1, 2"
)
OWNED_RULES_QUERY: Final = (
    "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, "
    "w.rulename::pg_catalog.text "
    "FROM pg_catalog.pg_rewrite AS w "
    "JOIN pg_catalog.pg_class AS c ON c.oid = w.ev_class "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
    "JOIN pg_catalog.pg_roles AS r ON r.oid = c.relowner "
    "WHERE r.rolname = :role AND w.rulename <> '_RETURN' ORDER BY 1, 2, 3"
)


ADMIN_HAS_ROLE_QUERY: Final = (
    "SELECT pg_catalog.pg_has_role(CURRENT_USER, r.oid, 'USAGE') "
    "FROM pg_catalog.pg_roles AS r WHERE r.rolname = :role"
)

SCHEMA_SIGNATURE_QUERY: Final = (
    "SELECT n.nspname, pg_catalog.count(c.oid), "
    "COALESCE(pg_catalog.max(c.oid::pg_catalog.int8), 0) "
    "FROM pg_catalog.pg_namespace AS n "
    f"LEFT JOIN pg_catalog.pg_class AS c ON c.relnamespace = n.oid AND c.relkind IN {_RELKINDS} "
    "WHERE n.nspname = ANY(CAST(:schemas AS pg_catalog.text[])) "
    "GROUP BY n.nspname"
)


def group_lock_keys(database: str, schemas: Iterable[str]) -> list[int]:
    """Lock order step 3: one group-lock key per touched schema, in sorted order (the locks
    themselves are taken in ``admin_database``, see :mod:`waypoint.provision.locks`)."""
    return sorted({group_lock_key(database, s) for s in schemas})
