"""Disarming what a role owns, in the current database and transaction (blocking; in a worker
thread): its trigger functions on tables it does not own are dropped, and a Waypoint group's
code is made to run as whoever calls it. Used when a role leaves a group (a provision, a
revocation) and by the reaper."""

from __future__ import annotations

import functools
from collections.abc import Callable

from waypoint.observability.log import get_logger
from waypoint.provision import sql
from waypoint.provision.admin import AdminError, AdminPools, AdminSession

log = get_logger("provision")


def _act_as(sess: AdminSession, owner: str, inherit_clause: str) -> None:
    """Give the admin the privileges of ``owner`` (it created the role, so it may: 15
    CREATEROLE, 16+ its ADMIN OPTION) unless it has them: needed to alter or drop what
    ``owner`` owns. Waypoint's login roles have it from creation, its groups not."""
    if not sess.run(sql.ADMIN_HAS_ROLE_QUERY, role=owner)[0][0]:
        sess.run(sql.grant_role_to_admin(owner, inherit_clause))


def disarm_code(sess: AdminSession, owner: str, inherit_clause: str = "") -> int:
    """In the current database and transaction: make the code ``owner`` owns run as whoever
    calls it (SECURITY INVOKER routines, ``security_invoker`` views) and drop the rules on its
    tables (see :data:`sql.DEFINER_ROUTINES_QUERY`). Returns how many objects changed."""
    routines = [str(r[0]) for r in sess.run(sql.DEFINER_ROUTINES_QUERY, role=owner)]
    views = [(str(a), str(b)) for a, b in sess.run(sql.OWNED_VIEWS_QUERY, role=owner)]
    rules = [(str(a), str(b), str(c)) for a, b, c in sess.run(sql.OWNED_RULES_QUERY, role=owner)]
    if routines or views or rules:
        _act_as(sess, owner, inherit_clause)
    for sig in routines:
        sess.run(sql.make_invoker(sig))
    for schema, view in views:
        sess.run(sql.view_as_invoker(schema, view))
    for schema, table, rule in rules:
        sess.run(sql.drop_rule(schema, table, rule))
    return len(routines) + len(views) + len(rules)


async def disarm_everywhere(
    pools: AdminPools,
    owner: str,
    *,
    group: bool,
    inherit_clause: str,
    check: Callable[[AdminSession], object] | None = None,
) -> None:
    """In every connectable database where ``owner`` owns objects, one transaction each:
    ``check`` (raising stops it), its trigger functions on tables it does not own dropped,
    and for a Waypoint group (``group``) its code disarmed (:func:`disarm_code`)."""

    def owned_in(sess: AdminSession) -> list[str]:
        return [str(r[0]) for r in sess.run(sql.OWNED_DATABASES_QUERY, role=owner)]

    def txn(sess: AdminSession, database: str) -> None:
        sess.run("BEGIN")
        if check is not None:
            check(sess)
        dropped = drop_foreign_triggers(sess, owner, lost_only=False, inherit_clause=inherit_clause)
        changed = disarm_code(sess, owner, inherit_clause) if group else 0
        sess.run("COMMIT")
        if dropped or changed:
            log.info(
                "role_triggers_dropped",
                role=owner,
                db=database,
                triggers=list(dropped),
                disarmed=changed,
            )

    for database in await pools.run(pools.admin_database, owned_in):
        try:
            await pools.run(database, functools.partial(txn, database=database))
        except AdminError as exc:
            if exc.sqlstate != "3D000":  # a database dropped meanwhile has nothing left
                raise


def drop_foreign_triggers(
    sess: AdminSession, role: str, *, lost_only: bool, inherit_clause: str = ""
) -> tuple[str, ...]:
    """In the current database and transaction: drop the trigger functions ``role`` owns that
    fire on tables it does not own (with their triggers; see
    :data:`sql.FOREIGN_TRIGGER_FUNCTIONS_QUERY`). ``lost_only``: only those on tables where
    the role no longer holds TRIGGER. Returns the functions dropped. Blocking."""
    found = sess.run(sql.FOREIGN_TRIGGER_FUNCTIONS_QUERY, role=role, lost=lost_only)
    names = tuple(str(r[0]) for r in found)
    if names:
        _act_as(sess, role, inherit_clause)
    for name in names:
        sess.run(sql.drop_function_cascade(name))
    return names
