"""atheris target: raw SQL grant entries (``render_and_validate``).

The input is the control byte (dialect, role and database names) and one entry's
text. Allowed outcomes: the rendered statement list, or RawSqlError. Property of
an accepted entry: PostgreSQL's parser (pglast) reads the returned text as exactly
one GRANT/REVOKE of privileges or ALTER DEFAULT PRIVILEGES, with no grant option,
no GRANTED BY, no FOR ROLE, and exactly one grantee: the role.

    python tests/fuzz/fuzz_rawsql.py -max_total_time=600 tests/fuzz/corpus/rawsql
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Chunks, fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    import pglast
    from pglast import ast
    from pglast.enums import RoleSpecType

    from waypoint.provision.dialect import CockroachDialect, Dialect, PostgresDialect
    from waypoint.provision.rawsql import RawSqlError, render_and_validate

DIALECTS: tuple[Dialect, ...] = (
    PostgresDialect("PostgreSQL 18.0", 18),
    CockroachDialect("CockroachDB CCL v24.1.0", 24),
)
ROLES = ("wp_grp_fuzz_0123456789abcdef_app", 'wp_"odd" Role')
DATABASES = ("app", 'my "db"')


def assert_pinned_to_role(sql: str, role: str) -> None:
    """``sql`` is exactly one privilege GRANT/REVOKE or ALTER DEFAULT PRIVILEGES whose
    only grantee is ``role``."""
    stmts = pglast.parse_sql(sql)
    assert len(stmts) == 1, f"{len(stmts)} statements accepted"
    stmt = stmts[0].stmt
    grant: object
    if isinstance(stmt, ast.AlterDefaultPrivilegesStmt):
        for opt in stmt.options or ():
            assert isinstance(opt, ast.DefElem) and opt.defname == "schemas", opt
        grant = stmt.action
    else:
        grant = stmt
    assert isinstance(grant, ast.GrantStmt), type(grant).__name__
    assert not grant.grant_option and grant.grantor is None
    grantees = grant.grantees or ()
    assert len(grantees) == 1
    (grantee,) = grantees
    assert isinstance(grantee, ast.RoleSpec)
    assert grantee.roletype == RoleSpecType.ROLESPEC_CSTRING and grantee.rolename == role


def test_one_input(data: bytes) -> None:
    chunks = Chunks(data)
    control = chunks.control
    dialect = DIALECTS[control & 1]
    role = ROLES[(control >> 1) & 1]
    database = DATABASES[(control >> 2) & 1]
    entry = chunks.payload.decode("utf-8", "replace")
    try:
        out = render_and_validate([entry], role=role, database=database, dialect=dialect)
    except RawSqlError as exc:
        assert exc.index == 0
        return
    assert len(out) == 1
    assert_pinned_to_role(out[0], role)


if __name__ == "__main__":
    fuzz(test_one_input)
