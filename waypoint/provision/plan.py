"""The plan of a provision, pure: the groups a grant needs (their DDL, their raw SQL, the
schemas they touch) and the fingerprint of a grant (what forces a new secret when it changes)."""

from __future__ import annotations

import hashlib
import json

from attrs import frozen

from waypoint.grants import naming
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.provision import sql
from waypoint.provision.dialect import Dialect
from waypoint.provision.rawsql import render_and_validate, touched_schemas


def grant_fingerprint(grant: EffectiveGrant) -> str:
    """What decides a role's privileges (limits excluded): changes force a new secret."""
    doc = {
        "listener": grant.listener,
        "database": grant.database,
        "cap": grant.preset_cap.label if grant.preset_cap is not None else None,
        "privileges": sorted([p.preset.label, p.schema] for p in grant.privileges),
        "custom": sorted(
            [sorted([p.preset.label, p.schema] for p in c.privileges), list(c.sql)]
            for c in grant.custom
        ),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@frozen
class GroupPlan:
    name: str
    comment: str
    # (schema, statements that need the schema to exist); applied in order.
    schema_grants: tuple[tuple[str, tuple[str, ...]], ...]
    raw_sql: tuple[str, ...]
    schemas: frozenset[str]  # what its ACL statements touch (group locks and signature)


@frozen
class ProvisionPlan:
    role: str
    database: str
    owner: naming.RoleOwner
    comment: str
    groups: tuple[GroupPlan, ...]

    @property
    def schemas(self) -> frozenset[str]:
        out: set[str] = set()
        for g in self.groups:
            out |= g.schemas
        return frozenset(out)


def build_plan(
    prefix: str, role: str, identity: Identity, grant: EffectiveGrant, dialect: Dialect
) -> ProvisionPlan:
    """The groups for ``grant``. Raises RawSqlError for a refused raw-SQL entry."""
    db = grant.database
    groups: list[GroupPlan] = []
    for sp in sorted(grant.privileges):
        name = naming.group_name(prefix, sp.preset, sp.schema, db)
        groups.append(
            GroupPlan(
                name=name,
                comment=naming.group_comment(sp.preset, sp.schema, db),
                schema_grants=((sp.schema, tuple(sql.preset_grants(sp.preset, sp.schema, name))),),
                raw_sql=(),
                schemas=frozenset({sp.schema}),
            )
        )
    for custom in grant.custom:
        name = naming.custom_group_name(prefix, custom, db)
        raw = tuple(render_and_validate(custom.sql, role=name, database=db, dialect=dialect))
        pairs = sorted(custom.privileges)
        groups.append(
            GroupPlan(
                name=name,
                comment=naming.custom_group_comment(custom, db),
                schema_grants=tuple(
                    (sp.schema, tuple(sql.preset_grants(sp.preset, sp.schema, name)))
                    for sp in pairs
                ),
                raw_sql=raw,
                schemas=frozenset({sp.schema for sp in pairs} | touched_schemas(raw)),
            )
        )
    # One group per name (two identical custom entries share their group).
    unique = {g.name: g for g in groups}
    owner = naming.role_owner(identity, grant.listener, db, grant.preset_cap)
    comment = naming.role_comment(identity, grant.listener, db, grant.preset_cap)
    return ProvisionPlan(role, db, owner, comment, tuple(unique.values()))
