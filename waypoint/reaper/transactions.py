"""What the role reaper runs on one admin session: the catalog reads and the transactions of a
drop and of a retirement (the SQL text itself is in :mod:`waypoint.reaper.catalog`).

Every function here is blocking and takes an :class:`AdminSession`: the engine
(:mod:`waypoint.reaper.engine`) runs each in a worker thread through
``AdminPools.run``, which rolls the transaction back on any exception, and holds the locks
they run under. The decisions (which roles, in which order, whether a role is still
eligible) are the engine's: a transaction calls back into them through ``check`` and
``recheck``, under the locks, and stops with :class:`NotEligible` or :class:`Refused`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from typing import Any

from attrs import frozen
from pg8000.exceptions import DatabaseError

from waypoint.grants import naming
from waypoint.provision import sql as provision_sql
from waypoint.provision.admin import AdminSession
from waypoint.provision.disarm import disarm_code, drop_foreign_triggers
from waypoint.reaper import catalog

__all__ = [
    "Check",
    "MoreSchemas",
    "NotEligible",
    "Owned",
    "Recheck",
    "Refused",
    "RoleInfo",
    "connectable_databases",
    "dependent_databases",
    "dependent_schemas",
    "drop_txn",
    "list_roles",
    "mark_retired",
    "one_role",
    "owned_summary",
    "reassign_target_problem",
    "server_version",
    "strip_for_retirement",
]


# -- values ------------------------------------------------------------------------


@frozen
class RoleInfo:
    """A role with the listener's prefix, as the catalog shows it now."""

    name: str
    comment: str | None
    valid_until: datetime | None  # None: unset or infinite
    expired: bool
    live_sessions: int
    groups: tuple[str, ...]  # roles it is a member of
    members: tuple[str, ...]  # roles that are members of it (the admin excluded)
    owned: int = 0  # objects it owns in the whole cluster (pg_shdepend owner rows)
    prepared: int = 0  # its prepared transactions (PREPARE TRANSACTION), in any database

    @property
    def retired(self) -> bool:
        """Whether the reaper retired it (it owned objects when it expired)."""
        return naming.is_retired_comment(self.comment or "")

    @property
    def owner(self) -> naming.RoleOwner | None:
        """The identity recorded in Waypoint's role marker, or None (not a Waypoint user role)."""
        return naming.parse_role_comment(self.comment or "")

    @property
    def group_owner(self) -> naming.GroupOwner | None:
        """What Waypoint's group marker records, or None (not a Waypoint group)."""
        return naming.parse_group_comment(self.comment or "")


@frozen
class Owned:
    """How many objects of one kind a role owns in one database (None: cluster-wide)."""

    role: str
    database: str | None
    kind: str
    count: int


class NotEligible(Exception):
    """Raised inside a drop transaction when the re-check under the locks says no."""

    def __init__(self, reason: str, *, gone: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.gone = gone


class Refused(Exception):
    """The reap of one role cannot go on safely (its reason is reported as a failure)."""


class MoreSchemas(Exception):
    """The role has objects in schemas whose group locks are not held: retry with them."""

    def __init__(self, schemas: set[str]) -> None:
        super().__init__(f"objects in schemas {sorted(schemas)}")
        self.schemas = schemas


Check = Callable[[AdminSession], None]
#: Re-reads a role under the locks (given the roles this instance uses); raises if it may not
#: be reaped any more.
Recheck = Callable[[AdminSession, frozenset[str]], RoleInfo]


# -- reads -------------------------------------------------------------------------


def server_version(sess: AdminSession) -> str:
    """``SELECT version()``: what the dialect is told from."""
    return str(sess.run(catalog.VERSION_QUERY)[0][0])


def list_roles(sess: AdminSession, prefix: str) -> list[RoleInfo]:
    """Every role whose name starts with ``prefix`` (marked or not)."""
    return _parse_rows(sess.run(catalog.ROLES_QUERY, pattern=catalog.like_prefix(prefix)))


def one_role(sess: AdminSession, name: str) -> RoleInfo | None:
    """The role ``name`` (None: there is none)."""
    rows = _parse_rows(sess.run(catalog.ROLE_QUERY, name=name))
    return rows[0] if rows else None


def _parse_rows(rows: Iterable[list[Any]]) -> list[RoleInfo]:
    out: list[RoleInfo] = []
    for name, comment, until, expired, live, groups, members, owned, prepared in rows:
        out.append(
            RoleInfo(
                name=str(name),
                comment=None if comment is None else str(comment),
                valid_until=until if isinstance(until, datetime) else None,
                expired=bool(expired),
                live_sessions=int(str(live)),
                groups=tuple(str(g) for g in (groups or ())),
                members=tuple(str(m) for m in (members or ())),
                owned=int(str(owned)),
                prepared=int(str(prepared)),
            )
        )
    return out


def owned_summary(sess: AdminSession, prefix: str) -> tuple[Owned, ...]:
    """What the roles whose name starts with ``prefix`` own, per database and kind."""
    rows = sess.run(catalog.OWNED_SUMMARY_QUERY, pattern=catalog.like_prefix(prefix))
    return tuple(
        Owned(
            str(role),
            None if db is None else str(db),
            catalog.OBJECT_KINDS.get(str(cls), str(cls)),
            int(str(n)),
        )
        for role, db, cls, n in rows
    )


def connectable_databases(sess: AdminSession) -> set[str]:
    """The databases that accept connections."""
    return {str(r[0]) for r in sess.run(catalog.CONNECTABLE_DATABASES_QUERY)}


def dependent_databases(sess: AdminSession, role: str) -> list[tuple[str, bool]]:
    """Each database where ``role`` owns objects or holds privileges, and whether it accepts
    connections."""
    return [(str(r[0]), bool(r[1])) for r in sess.run(catalog.DEPENDENT_DATABASES_QUERY, role=role)]


def dependent_schemas(sess: AdminSession, role: str) -> set[str]:
    """The schemas of this database where ``role`` owns objects or holds privileges."""
    return {str(r[0]) for r in sess.run(catalog.DEPENDENT_SCHEMAS_QUERY, role=role)}


def reassign_target_problem(sess: AdminSession, target: str) -> str | None:
    """Why ``target`` may not receive a caller's objects (None: it may). A role that could
    log in, holds any of SUPERUSER / CREATEROLE / CREATEDB / BYPASSRLS / REPLICATION, or is a
    member of any role would run the caller's code (SECURITY DEFINER functions, views) with
    more than the caller had."""
    rows = sess.run(catalog.REASSIGN_TARGET_QUERY, name=target)
    if not rows:
        return f"role {target!r} does not exist"
    login, superuser, createrole, createdb, bypassrls, replication, groups = rows[0]
    attrs = [
        name
        for name, held in (
            ("LOGIN", login),
            ("SUPERUSER", superuser),
            ("CREATEROLE", createrole),
            ("CREATEDB", createdb),
            ("BYPASSRLS", bypassrls),
            ("REPLICATION", replication),
        )
        if held
    ]
    problems: list[str] = []
    if attrs:
        problems.append("has " + ", ".join(attrs))
    if groups:
        problems.append("is a member of " + ", ".join(str(g) for g in groups))
    if not problems:
        return None
    return (
        f"role {target!r} {' and '.join(problems)}: objects of reaped roles (their SECURITY "
        "DEFINER functions and views) would run with its privileges; use a NOLOGIN role "
        "with none of SUPERUSER, CREATEROLE, CREATEDB, BYPASSRLS, REPLICATION and no "
        "memberships"
    )


# -- transactions --------------------------------------------------------------------


def drop_txn(
    sess: AdminSession,
    role: str,
    *,
    database: str,
    reassign_to: str | None,
    locked: Collection[str],
    check: Check,
    drop_role: bool,
    inherit_clause: str,
) -> None:
    """One transaction in ``database``: re-check, [REASSIGN OWNED,] DROP OWNED [, DROP ROLE],
    under the group locks of the schemas ``locked`` (held by the caller). Objects in a schema
    outside ``locked`` (created since the caller looked) raise :class:`MoreSchemas`.

    Without ``reassign_to`` the role must own nothing here (re-checked): ``DROP OWNED`` then
    only revokes its privileges, it never drops a caller's objects. With ``reassign_to``
    (checked by the caller in this pass) the role's foreign-table trigger functions are
    dropped and its code made to run as its invoker before ``REASSIGN OWNED``.

    ``REASSIGN OWNED`` and ``DROP OWNED`` need the privileges of ``role``: the admin makes
    itself a member first (15: ``GRANT r TO CURRENT_USER``; 16+: ``... WITH INHERIT TRUE``,
    which its ADMIN OPTION on roles it created allows). Provisioning already does this for
    login roles; groups, and roles of a cluster upgraded from 15, need it here.
    """
    sess.run("BEGIN")
    schemas = dependent_schemas(sess, role)
    if not schemas <= set(locked):
        raise MoreSchemas(schemas)
    check(sess)
    sess.run(provision_sql.grant_role_to_admin(role, inherit_clause))
    if reassign_to is None:
        rows = sess.run(catalog.OWNED_HERE_QUERY, role=role)
        owned = int(str(rows[0][0])) if rows else 0
        if owned:
            raise NotEligible(f"owns {owned} object(s) in {database}")
    else:
        problem = reassign_target_problem(sess, reassign_to)  # again, in this transaction
        if problem is not None:
            raise Refused(f"reassign_to refused, nothing reaped: {problem}")
        drop_foreign_triggers(sess, role, lost_only=False, inherit_clause=inherit_clause)
        disarm_code(sess, role, inherit_clause)
        sess.run(catalog.reassign_owned(role, reassign_to))
    sess.run(catalog.drop_owned(role))
    if drop_role:
        sess.run(catalog.drop_role(role))
    sess.run("COMMIT")


def strip_for_retirement(
    sess: AdminSession, role: str, past: str, recheck: Recheck, in_use: frozenset[str]
) -> tuple[list[str], list[str]]:
    """A retirement's first transaction, in ``admin_database``: ``recheck``, every membership
    revoked, NOLOGIN, no password, ``VALID UNTIL`` ``past``, per-role settings reset. Returns
    the Waypoint groups the role left and the memberships that could not be revoked."""
    sess.run("BEGIN")
    recheck(sess, in_use)
    groups: list[str] = []
    for group, member in sess.run(catalog.ALL_MEMBERSHIPS_QUERY, role=role):
        # A membership another role granted may not be the admin's to revoke (16+):
        # the rest of the retirement goes on, and the pass reports it.
        sess.run("SAVEPOINT revoke_one")
        try:
            sess.run(catalog.revoke_role(str(group), str(member)))
        except DatabaseError:
            sess.run("ROLLBACK TO SAVEPOINT revoke_one")
        sess.run("RELEASE SAVEPOINT revoke_one")
        if str(member) == role and naming.parse_group_comment(
            str(sess.run(catalog.COMMENT_QUERY, name=str(group))[0][0] or "")
        ):
            groups.append(str(group))
    sess.run(catalog.retire_role(role, past))
    for (database,) in sess.run(catalog.ROLE_SETTINGS_QUERY, role=role):
        sess.run(catalog.reset_role_settings(role, None if database is None else str(database)))
    left = [f"{g} to {m}" for g, m in sess.run(catalog.ALL_MEMBERSHIPS_QUERY, role=role)]
    sess.run("COMMIT")
    return groups, left


def mark_retired(sess: AdminSession, role: str, recheck: Recheck, in_use: frozenset[str]) -> None:
    """A retirement's last transaction: ``recheck``, then the retired marker."""
    sess.run("BEGIN")
    owner = recheck(sess, in_use).owner
    assert owner is not None  # recheck: still ours
    sess.run(catalog.comment_on_role(role, naming.retired_role_comment(owner)))
    sess.run("COMMIT")
