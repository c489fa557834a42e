"""SQL text of the role reaper: catalog queries and the DDL of a drop. Pure, no I/O.

Catalog references are schema-qualified (admin sessions pin ``search_path =
pg_catalog, pg_temp``); queries take ``pg8000.native`` ``:name`` parameters;
DDL quotes identifiers with ``pg8000.native.identifier()``.

Where a role holds objects or privileges is read from ``pg_shdepend`` (a shared
catalog, the very table ``DROP ROLE`` consults to refuse with 2BP01): its
``dbid`` names every database to visit, ``dbid = 0`` rows (privileges on
databases, owned databases) are handled from any database.
"""

from __future__ import annotations

from typing import Final

from pg8000.native import identifier, literal

LIKE_ESCAPE: Final = "!"
_DEFAULT_ACL: Final = "'pg_catalog.pg_default_acl'::pg_catalog.regclass"


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching names that start with ``prefix`` exactly (``_`` is not a
    wildcard here; escape character ``!``)."""
    escaped = "".join(LIKE_ESCAPE + ch if ch in ("_", "%", LIKE_ESCAPE) else ch for ch in prefix)
    return escaped + "%"


# One row per role whose name starts with the prefix:
# name, comment, valid_until (NULL when unset or infinite), expired, live sessions,
# groups it is a member of, roles that are members of it (the admin itself excluded: on 16+
# the creator of a role holds a membership row carrying ADMIN OPTION), and how many objects
# it owns in the whole cluster (``pg_shdepend`` owner rows: relations, functions, types,
# schemas, large objects ... of every database; default privileges are not objects), and
# how many transactions it prepared that wait to be finished (``pg_prepared_xacts``).
ROLES_QUERY: Final = (
    "SELECT r.rolname::pg_catalog.text, "
    "pg_catalog.shobj_description(r.oid, 'pg_authid'), "
    "CASE WHEN pg_catalog.isfinite(r.rolvaliduntil) THEN r.rolvaliduntil END, "
    "COALESCE(r.rolvaliduntil < pg_catalog.now(), false), "
    "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity AS a "
    " WHERE a.usesysid = r.oid), "
    "ARRAY(SELECT g.rolname::pg_catalog.text FROM pg_catalog.pg_auth_members AS m "
    " JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid WHERE m.member = r.oid ORDER BY 1), "
    "ARRAY(SELECT u.rolname::pg_catalog.text FROM pg_catalog.pg_auth_members AS m "
    " JOIN pg_catalog.pg_roles AS u ON u.oid = m.member "
    " WHERE m.roleid = r.oid AND u.rolname <> CURRENT_USER ORDER BY 1), "
    "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_shdepend AS s "
    " WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass "
    " AND s.refobjid = r.oid AND s.deptype = 'o' "
    f" AND s.classid <> {_DEFAULT_ACL}), "
    "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_xacts AS p "
    " WHERE p.owner = r.rolname) "
    "FROM pg_catalog.pg_roles AS r "
    f"WHERE r.rolname LIKE :pattern ESCAPE '{LIKE_ESCAPE}' "
    "ORDER BY r.rolname"
)

# The same columns for one role by exact name (the re-check under the locks).
ROLE_QUERY: Final = ROLES_QUERY.replace(
    f"WHERE r.rolname LIKE :pattern ESCAPE '{LIKE_ESCAPE}' ", "WHERE r.rolname = :name "
)

# Databases where the role has dependencies (owned objects, privileges, policies, default ACLs).
DEPENDENT_DATABASES_QUERY: Final = (
    "SELECT DISTINCT d.datname::pg_catalog.text, d.datallowconn "
    "FROM pg_catalog.pg_shdepend AS s "
    "JOIN pg_catalog.pg_database AS d ON d.oid = s.dbid "
    "WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass "
    "AND s.refobjid = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = :role) "
    "ORDER BY 1"
)

# Connectable databases (to tell a group's vanished database from a live one).
CONNECTABLE_DATABASES_QUERY: Final = (
    "SELECT d.datname::pg_catalog.text FROM pg_catalog.pg_database AS d "
    "WHERE d.datallowconn ORDER BY 1"
)

# Schemas of the current database in which the role owns objects or holds privileges: the
# schemas whose group locks (lock order step 3) its REASSIGN/DROP OWNED must take.
DEPENDENT_SCHEMAS_QUERY: Final = (
    "SELECT DISTINCT n.nspname::pg_catalog.text "
    "FROM pg_catalog.pg_shdepend AS s "
    "JOIN pg_catalog.pg_namespace AS n ON n.oid = CASE "
    " WHEN s.classid = 'pg_catalog.pg_class'::pg_catalog.regclass THEN "
    "  (SELECT c.relnamespace FROM pg_catalog.pg_class AS c WHERE c.oid = s.objid) "
    " WHEN s.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass THEN "
    "  (SELECT p.pronamespace FROM pg_catalog.pg_proc AS p WHERE p.oid = s.objid) "
    " WHEN s.classid = 'pg_catalog.pg_type'::pg_catalog.regclass THEN "
    "  (SELECT t.typnamespace FROM pg_catalog.pg_type AS t WHERE t.oid = s.objid) "
    " WHEN s.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass THEN s.objid "
    " WHEN s.classid = 'pg_catalog.pg_default_acl'::pg_catalog.regclass THEN "
    "  (SELECT da.defaclnamespace FROM pg_catalog.pg_default_acl AS da WHERE da.oid = s.objid) "
    "END "
    "WHERE s.dbid = (SELECT d.oid FROM pg_catalog.pg_database AS d "
    " WHERE d.datname = pg_catalog.current_database()) "
    "AND s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass "
    "AND s.refobjid = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = :role) "
    "ORDER BY 1"
)

# What the roles under a prefix own, per database and kind (``waypoint roles list``): role,
# database (NULL for cluster-wide objects), catalog of the objects, count.
OWNED_SUMMARY_QUERY: Final = (
    "SELECT r.rolname::pg_catalog.text, d.datname::pg_catalog.text, "
    "s.classid::pg_catalog.regclass::pg_catalog.text, pg_catalog.count(*) "
    "FROM pg_catalog.pg_shdepend AS s "
    "JOIN pg_catalog.pg_roles AS r ON r.oid = s.refobjid "
    "LEFT JOIN pg_catalog.pg_database AS d ON d.oid = s.dbid "
    "WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass AND s.deptype = 'o' "
    f"AND r.rolname LIKE :pattern ESCAPE '{LIKE_ESCAPE}' "
    "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
)

# How many objects the role owns in the current database (the re-check before DROP OWNED,
# which must only ever revoke privileges, never drop a caller's objects; its default
# privileges, ``ALTER DEFAULT PRIVILEGES`` settings rather than objects, may go).
OWNED_HERE_QUERY: Final = (
    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_shdepend AS s "
    "WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass AND s.deptype = 'o' "
    f"AND s.classid <> {_DEFAULT_ACL} "
    "AND s.dbid = (SELECT d.oid FROM pg_catalog.pg_database AS d "
    " WHERE d.datname = pg_catalog.current_database()) "
    "AND s.refobjid = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = :role)"
)

# Every membership of the role in either direction, the admin's own membership in it aside:
# (group, member) pairs to revoke when the role is retired.
ALL_MEMBERSHIPS_QUERY: Final = (
    "SELECT g.rolname::pg_catalog.text, u.rolname::pg_catalog.text "
    "FROM pg_catalog.pg_auth_members AS m "
    "JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid "
    "JOIN pg_catalog.pg_roles AS u ON u.oid = m.member "
    "WHERE (u.rolname = :role OR (g.rolname = :role AND u.rolname <> CURRENT_USER)) "
    "ORDER BY 1, 2"
)

# The role's per-role settings: NULL for ``ALTER ROLE r SET``, else the database name of
# ``ALTER ROLE r IN DATABASE d SET``.
ROLE_SETTINGS_QUERY: Final = (
    "SELECT d.datname::pg_catalog.text FROM pg_catalog.pg_db_role_setting AS s "
    "LEFT JOIN pg_catalog.pg_database AS d ON d.oid = s.setdatabase "
    "WHERE s.setrole = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = :role)"
)

# What decides whether ``reassign_to`` may receive a caller's objects: exists, can log in,
# the attributes that reach beyond its own objects, the roles it is a member of.
REASSIGN_TARGET_QUERY: Final = (
    "SELECT r.rolcanlogin, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls, "
    "r.rolreplication, "
    "ARRAY(SELECT g.rolname::pg_catalog.text FROM pg_catalog.pg_auth_members AS m "
    " JOIN pg_catalog.pg_roles AS g ON g.oid = m.roleid WHERE m.member = r.oid ORDER BY 1) "
    "FROM pg_catalog.pg_roles AS r WHERE r.rolname = :name"
)

COMMENT_QUERY: Final = (
    "SELECT pg_catalog.shobj_description(r.oid, 'pg_authid') FROM pg_catalog.pg_roles AS r "
    "WHERE r.rolname = :name"
)

VERSION_QUERY: Final = "SELECT pg_catalog.version()"

# Reading pg_shdepend's classid: what a row of each catalog is called in ``roles list``.
OBJECT_KINDS: Final = {
    "pg_class": "relations",
    "pg_proc": "functions",
    "pg_type": "types",
    "pg_namespace": "schemas",
    "pg_largeobject": "large objects",
    "pg_default_acl": "default privileges",
    "pg_operator": "operators",
    "pg_collation": "collations",
    "pg_conversion": "conversions",
    "pg_ts_config": "text search configurations",
    "pg_ts_dict": "text search dictionaries",
    "pg_opclass": "operator classes",
    "pg_opfamily": "operator families",
    "pg_extension": "extensions",
    "pg_foreign_server": "foreign servers",
    "pg_foreign_data_wrapper": "foreign-data wrappers",
    "pg_event_trigger": "event triggers",
    "pg_publication": "publications",
    "pg_subscription": "subscriptions",
    "pg_statistic_ext": "statistics objects",
    "pg_database": "databases",
    "pg_tablespace": "tablespaces",
}


def reassign_owned(role: str, to: str) -> str:
    """``REASSIGN OWNED BY r TO <to>`` (``to`` is a checked ``reassign_to``, never the admin)."""
    return f"REASSIGN OWNED BY {identifier(role)} TO {identifier(to)}"


def revoke_role(group: str, member: str) -> str:
    return f"REVOKE {identifier(group)} FROM {identifier(member)}"


def retire_role(role: str, past: str) -> str:
    """No login, no password, ``VALID UNTIL`` in the past (``past`` a timestamp literal)."""
    return f"ALTER ROLE {identifier(role)} NOLOGIN PASSWORD NULL VALID UNTIL {past}"


def reset_role_settings(role: str, database: str | None) -> str:
    if database is None:
        return f"ALTER ROLE {identifier(role)} RESET ALL"
    return f"ALTER ROLE {identifier(role)} IN DATABASE {identifier(database)} RESET ALL"


def comment_on_role(role: str, comment: str) -> str:
    return f"COMMENT ON ROLE {identifier(role)} IS {literal(comment)}"


def drop_owned(role: str) -> str:
    return f"DROP OWNED BY {identifier(role)}"


def drop_role(role: str) -> str:
    return f"DROP ROLE {identifier(role)}"
