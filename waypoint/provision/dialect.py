"""Which SQL server Waypoint administers.

``SELECT version()`` runs once on the first admin session of a listener; a
version string containing ``CockroachDB`` selects :class:`CockroachDialect`,
anything else :class:`PostgresDialect`. The dialect answers the few questions
where the two differ: how to find a role, whether advisory locks exist,
whether the reaper runs, and which raw-SQL forms are refused.
"""

from __future__ import annotations

import re
from typing import ClassVar, Final

from attrs import frozen

_PG_VERSION_RE: Final = re.compile(r"PostgreSQL (\d+)(?:\.(\d+))?")
_CRDB_VERSION_RE: Final = re.compile(r"CockroachDB \w+ v(\d+)\.(\d+)")


@frozen
class PostgresDialect:
    """PostgreSQL: advisory locks, pg_roles/pg_authid, role comments."""

    version_text: str
    major: int

    name: ClassVar[str] = "postgresql"

    @property
    def has_advisory_locks(self) -> bool:
        return True

    @property
    def supports_role_comments(self) -> bool:
        return True

    @property
    def refuses_for_all_roles(self) -> bool:
        # PostgreSQL's parser rejects FOR ALL ROLES by itself (a syntax error).
        return False

    @property
    def admin_inherit_clause(self) -> str:
        """How the admin becomes a member of a role it creates (15 vs 16+)."""
        return " WITH INHERIT TRUE" if self.major >= 16 else ""

    @property
    def member_clause(self) -> str:
        """How a user role joins a group: on 16+ without SET, so that it can never ``SET
        ROLE`` to the shared group and create objects (code) the group would own."""
        return " WITH INHERIT TRUE, SET FALSE" if self.major >= 16 else ""

    @property
    def members_can_set_role(self) -> bool:
        """Whether a user role may ``SET ROLE`` to a group it is a member of (15 and older:
        every membership carries it; 16+: ``member_clause`` grants without SET). A session
        that did keeps the group's privileges after the membership is revoked: PostgreSQL
        checks membership only when ``SET ROLE`` runs."""
        return self.major < 16

    @property
    def role_lookup_sql(self) -> str:
        """One row (rolname, comment, rolcanlogin) when the role ``$1`` exists."""
        return (
            "SELECT r.rolname, pg_catalog.shobj_description(r.oid, 'pg_authid'), r.rolcanlogin "
            "FROM pg_catalog.pg_roles AS r WHERE r.rolname = :name"
        )

    def reaper_enabled(self, reap_on_cockroachdb: bool) -> bool:
        return True


@frozen
class CockroachDialect:
    """CockroachDB: no advisory locks (so provisioning is refused), roles in system.users."""

    version_text: str
    major: int

    name: ClassVar[str] = "cockroachdb"

    @property
    def has_advisory_locks(self) -> bool:
        return False

    @property
    def supports_role_comments(self) -> bool:
        return False

    @property
    def refuses_for_all_roles(self) -> bool:
        return True

    @property
    def admin_inherit_clause(self) -> str:
        return ""

    @property
    def member_clause(self) -> str:
        return ""

    @property
    def members_can_set_role(self) -> bool:
        # Downgrades there only revoke memberships and end nothing (docs/security.md).
        return False

    @property
    def role_lookup_sql(self) -> str:
        return (
            'SELECT u.username, NULL, NOT u."isRole" FROM system.users AS u '
            "WHERE u.username = :name"
        )

    def reaper_enabled(self, reap_on_cockroachdb: bool) -> bool:
        return reap_on_cockroachdb


Dialect = PostgresDialect | CockroachDialect


def detect_dialect(version_text: str) -> Dialect:
    """Pick the dialect from the text of ``SELECT version()``."""
    if "CockroachDB" in version_text:
        m = _CRDB_VERSION_RE.search(version_text)
        return CockroachDialect(version_text, int(m.group(1)) if m else 0)
    m = _PG_VERSION_RE.search(version_text)
    if m is None:
        raise ValueError(f"unrecognized server version string: {version_text[:120]!r}")
    return PostgresDialect(version_text, int(m.group(1)))


POSTGRES_DEFAULT: Final = PostgresDialect("PostgreSQL 16 (assumed)", 16)
