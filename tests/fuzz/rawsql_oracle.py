"""What an accepted raw SQL grant entry must be, shared by the atheris target
(fuzz_rawsql.py) and the hypothesis tests (tests/test_fuzz_rawsql.py): PostgreSQL's parser
(pglast) reads the text as exactly one GRANT/REVOKE of privileges or ALTER DEFAULT
PRIVILEGES, with no grant option, no GRANTED BY, no FOR ROLE, and one grantee: the role.

The atheris target imports this module inside its instrumentation block, so pglast and the
dialects are imported here, not before.
"""

from __future__ import annotations

import pglast
from pglast import ast
from pglast.enums import RoleSpecType

from waypoint.provision.dialect import CockroachDialect, Dialect, PostgresDialect

#: The dialects the entries are rendered for.
DIALECTS: tuple[Dialect, ...] = (
    PostgresDialect("PostgreSQL 18.0", 18),
    CockroachDialect("CockroachDB CCL v24.1.0", 24),
)


def assert_pinned_to_role(sql: str, role: str) -> None:
    """``sql`` is exactly one privilege GRANT/REVOKE or ALTER DEFAULT PRIVILEGES whose
    only grantee is ``role``."""
    stmts = pglast.parse_sql(sql)
    assert len(stmts) == 1, f"{len(stmts)} statements accepted: {sql!r}"
    stmt = stmts[0].stmt
    grant: object
    if isinstance(stmt, ast.AlterDefaultPrivilegesStmt):
        for opt in stmt.options or ():
            assert isinstance(opt, ast.DefElem) and opt.defname == "schemas", sql
        grant = stmt.action
    else:
        grant = stmt
    assert isinstance(grant, ast.GrantStmt), f"{type(grant).__name__} accepted: {sql!r}"
    assert not grant.grant_option and grant.grantor is None, sql
    grantees = grant.grantees or ()
    assert len(grantees) == 1, sql
    (grantee,) = grantees
    assert isinstance(grantee, ast.RoleSpec), sql
    assert grantee.roletype == RoleSpecType.ROLESPEC_CSTRING and grantee.rolename == role, sql
