"""The grant application: one transaction in the target database that creates or checks the
plan's groups, grants them what they need in the schemas that exist, sets the role's secret
(creating the role, or bringing a retired one back for its own caller) and brings its group
memberships to the plan. Blocking; runs in a worker thread, under the group locks of the
plan's schemas (held by the caller in ``admin_database``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from attrs import field, frozen

from waypoint.grants import naming
from waypoint.provision import sql
from waypoint.provision.admin import AdminSession
from waypoint.provision.dialect import CockroachDialect, Dialect
from waypoint.provision.disarm import disarm_code, drop_foreign_triggers
from waypoint.provision.model import GroupNotOurs, RoleMissing, RoleNotOurs
from waypoint.provision.plan import GroupPlan, ProvisionPlan

#: Per schema a group touches: (schema, number of its relations, their highest oid); a group
#: whose signature is unchanged since this process last granted it is not granted again.
Signature = tuple[tuple[str, int, int], ...]


@frozen
class PasswordChange:
    verifier: str = field(repr=False)
    valid_until: datetime
    #: ``ALTER ROLE ... SET`` statements applied with the secret (created or rotated).
    settings: tuple[str, ...] = ()
    #: Only on the role as it is, active (a reconcile): a missing or retired role is
    #: refused as without a new secret, never created or brought back.
    existing_only: bool = False


@frozen
class TxnResult:
    created: bool
    signatures: dict[str, Signature]
    dropped_triggers: tuple[str, ...]
    granted: tuple[str, ...]
    revoked: tuple[str, ...]


@frozen
class _RoleFound:
    exists: bool
    retired: bool


def provision_txn(
    sess: AdminSession,
    plan: ProvisionPlan,
    password: PasswordChange | None,
    known_signatures: Mapping[str, Signature],
    dialect: Dialect,
) -> TxnResult:
    """One transaction in the target database, under the group locks of ``plan.schemas``
    (held by the caller in ``admin_database``). Blocking; call in a worker thread."""
    sess.run("BEGIN")
    names = [plan.role, *(g.name for g in plan.groups)]
    existing = {
        str(r[0]): (r[1] if r[1] is None else str(r[1]))
        for r in sess.run(sql.ROLES_QUERY, names=names)
    }
    found = _check_role(plan, existing, password)
    present = _present_schemas(sess, plan)
    signatures: dict[str, Signature] = {}
    for group in plan.groups:
        signatures[group.name] = _apply_group(
            sess, plan.database, group, existing, present, known_signatures
        )
    if password is not None:
        _set_password(sess, plan, password, found, dialect.admin_inherit_clause)
    granted, revoked, dropped = _sync_memberships(sess, plan, found, dialect)
    sess.run("COMMIT")
    return TxnResult(not found.exists, signatures, dropped, granted, revoked)


def _check_role(
    plan: ProvisionPlan, existing: Mapping[str, str | None], password: PasswordChange | None
) -> _RoleFound:
    """The role as it is: another caller's (refused), missing or retired (refused without a
    new secret, or with one only for an existing active role: a retired role comes back only
    with a provision's), or this caller's."""
    exists = plan.role in existing
    if exists and naming.parse_role_comment(existing[plan.role] or "") != plan.owner:
        raise RoleNotOurs(plan.role)
    retired = exists and naming.is_retired_comment(existing[plan.role] or "")
    if (not exists or retired) and (password is None or password.existing_only):
        raise RoleMissing(plan.role)
    return _RoleFound(exists, retired)


def _present_schemas(sess: AdminSession, plan: ProvisionPlan) -> dict[str, tuple[int, int]]:
    """The schemas of the plan that exist, each with its (relation count, highest oid)."""
    schemas = sorted(s for s in plan.schemas if s)
    present: dict[str, tuple[int, int]] = {}
    if schemas:
        for nsp, count, maxoid in sess.run(sql.SCHEMA_SIGNATURE_QUERY, schemas=schemas):
            present[str(nsp)] = (int(count), int(maxoid))
    return present


def _apply_group(
    sess: AdminSession,
    database: str,
    group: GroupPlan,
    existing: Mapping[str, str | None],
    present: Mapping[str, tuple[int, int]],
    known_signatures: Mapping[str, Signature],
) -> Signature:
    """Create ``group`` or check its marker, and grant it what it needs unless its schemas
    are unchanged since this process last did. Returns its signature."""
    sig: Signature = tuple(
        (s, *present.get(s, (-1, -1))) for s in sorted(x for x in group.schemas if x)
    )
    if group.name not in existing:
        for stmt in sql.create_group(group.name, database, group.comment):
            sess.run(stmt)
    else:
        if naming.parse_group_comment(existing[group.name] or "") is None:
            raise GroupNotOurs(group.name)
        if known_signatures.get(group.name) == sig:
            return sig
    for schema, stmts in group.schema_grants:
        if schema not in present:
            continue  # a schema that does not exist (yet): its signature will change
        for stmt in stmts:
            sess.run(stmt)
    for stmt in group.raw_sql:
        sess.run(stmt)
    return sig


def _set_password(
    sess: AdminSession,
    plan: ProvisionPlan,
    password: PasswordChange,
    found: _RoleFound,
    inherit_clause: str,
) -> None:
    """The new secret: on the role as it is (a retired one active again for its own caller,
    whose marker matched), or on a role created now."""
    if found.exists:
        sess.run(sql.set_password(plan.role, password.verifier, password.valid_until))
        if found.retired:
            sess.run(sql.comment_on_role(plan.role, plan.comment))
    else:
        sess.run(sql.create_login_role(plan.role, password.verifier, password.valid_until))
        sess.run(sql.comment_on_role(plan.role, plan.comment))
        sess.run(sql.grant_role_to_admin(plan.role, inherit_clause))
    for stmt in password.settings:
        sess.run(stmt)


def _sync_memberships(
    sess: AdminSession, plan: ProvisionPlan, found: _RoleFound, dialect: Dialect
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Bring the role's Waypoint group memberships to the plan. Returns the groups granted,
    the groups revoked and the trigger functions dropped.

    Objects the role created stay its own: nothing is ever reassigned (to the admin or
    anyone), so its SECURITY DEFINER functions, views and rules run with the privileges the
    role holds from now on. Its triggers on tables it no longer may put triggers on go.
    A group's own code (a member may have created it after SET ROLE on 15; 16+ grants no
    SET) is disarmed whenever a member leaves, so no former member keeps its privileges."""
    inherit_clause = dialect.admin_inherit_clause
    current: set[str] = set()
    if found.exists:
        for gname, comment in sess.run(sql.MEMBERSHIPS_QUERY, role=plan.role):
            if naming.parse_group_comment(str(comment or "")) is not None:
                current.add(str(gname))
    desired = {g.name for g in plan.groups}
    extra = sorted(current - desired)
    missing = sorted(desired - current)
    dropped: tuple[str, ...] = ()
    for g in extra:
        sess.run(sql.revoke_membership(g, plan.role))
    # CockroachDB has no functions owned this way: nothing to disarm there.
    if extra and not isinstance(dialect, CockroachDialect):
        dropped = drop_foreign_triggers(
            sess, plan.role, lost_only=True, inherit_clause=inherit_clause
        )
        for g in extra:
            dropped += drop_foreign_triggers(
                sess, g, lost_only=False, inherit_clause=inherit_clause
            )
            disarm_code(sess, g, inherit_clause)
    for g in missing:
        sess.run(sql.grant_membership(g, plan.role, dialect.member_clause))
    return tuple(missing), tuple(extra), dropped


def strip_txn(sess: AdminSession, role: str, now: datetime) -> list[str] | None:
    """Access revoked, in one transaction in ``admin_database``: the role's Waypoint group
    memberships revoked and its ``VALID UNTIL`` set to ``now``. Returns the groups revoked
    (None: no such role). Blocking."""
    sess.run("BEGIN")
    rows = sess.run(sql.ROLES_QUERY, names=[role])
    if not rows:
        sess.run("ROLLBACK")
        return None
    if naming.parse_role_comment(str(rows[0][1] or "")) is None:
        raise RoleNotOurs(role)
    revoked: list[str] = []
    for gname, comment in sess.run(sql.MEMBERSHIPS_QUERY, role=role):
        if naming.parse_group_comment(str(comment or "")) is not None:
            sess.run(sql.revoke_membership(str(gname), role))
            revoked.append(str(gname))
    sess.run(sql.set_valid_until(role, now))
    sess.run("COMMIT")
    return revoked
