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
    from rawsql_oracle import DIALECTS, assert_pinned_to_role

    from waypoint.provision.rawsql import RawSqlError, render_and_validate

ROLES = ("wp_grp_fuzz_0123456789abcdef_app", 'wp_"odd" Role')
DATABASES = ("app", 'my "db"')


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
