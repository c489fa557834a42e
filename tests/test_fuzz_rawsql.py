"""Raw SQL entries as untrusted input (docs/security.md): arbitrary text → statements or
RawSqlError only; and what is accepted is exactly one privilege GRANT/REVOKE or
ALTER DEFAULT PRIVILEGES whose one grantee is the role, as PostgreSQL's own parser
(pglast) reads the very text that will run.

test_rawsql.py holds the curated accept/refuse corpora; here the statements are
generated from a small SQL grammar with hostile pieces (other grantees, PUBLIC,
GRANTED BY, WITH GRANT OPTION, FOR ROLE, comments, quoting, second statements,
template text), and the role and database names are arbitrary.
"""

from __future__ import annotations

from fuzz.rawsql_oracle import DIALECTS, assert_pinned_to_role
from hypothesis import given
from hypothesis import strategies as st

from waypoint.provision.dialect import CockroachDialect, Dialect
from waypoint.provision.rawsql import RawSqlError, render_and_validate

ROLE = "wp_grp_fuzz_0123456789abcdef_app"
DATABASE = "app"


privilege = st.sampled_from(
    ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "USAGE",
     "EXECUTE", "CREATE", "TEMP", "TEMPORARY", "CONNECT", "ALL", "ALL PRIVILEGES", "SELECT (id)",
     "MAINTAIN", "SET", "ALTER SYSTEM", "pg_read_all_data"]
)  # fmt: skip
target = st.sampled_from(
    ["public.t", "TABLE public.t", "t", "app.public.t", '"S"."T"', "public.a, app.b",
     "SEQUENCE public.s", "FUNCTION api.f(int)", "PROCEDURE api.p()", "ROUTINE api.r",
     "FUNCTION f()", "SCHEMA app", "SCHEMA app, public", "TYPE public.mood", "DOMAIN public.d",
     "TYPE mood", "DATABASE {{.Database}}", "DATABASE postgres", "DATABASE {{.Database}}, postgres",
     "ALL TABLES IN SCHEMA app", "ALL SEQUENCES IN SCHEMA app", "ALL FUNCTIONS IN SCHEMA app",
     "LARGE OBJECT 1", "TABLESPACE pg_default", "LANGUAGE plpgsql", "PARAMETER work_mem",
     "FOREIGN SERVER s", "FOREIGN DATA WRAPPER w"]
)  # fmt: skip
grantee = st.sampled_from(
    ["{{.Role}}", "{{ .Role }}", "PUBLIC", "postgres", "{{.Role}}, postgres", "postgres, {{.Role}}",
     "CURRENT_USER", "SESSION_USER", "CURRENT_ROLE", '"{{.Role}}"', "{{.Role}}x", "GROUP {{.Role}}",
     "{{.Database}}"]
)  # fmt: skip
suffix = st.sampled_from(
    ["", "", "", " WITH GRANT OPTION", " GRANTED BY postgres", " CASCADE", " RESTRICT",
     "; DROP TABLE public.t", ";", "; ", " -- comment", " /* c */", "\n", " WITH ADMIN OPTION",
     "; GRANT SELECT ON public.t TO {{.Role}}"]
)  # fmt: skip
prefix = st.sampled_from(
    ["", "", "", "/* x */ ", "-- c\n", "  ", "BEGIN; ", "REVOKE GRANT OPTION FOR ", "GRANT ", "grant "]
)  # fmt: skip
default_opts = st.sampled_from(
    ["", "IN SCHEMA app ", "IN SCHEMA app, public ", "FOR ROLE postgres ", "FOR USER x ",
     "FOR ALL ROLES ", "FOR ROLE {{.Role}} "]
)  # fmt: skip
defaults_target = st.sampled_from(
    ["TABLES", "SEQUENCES", "FUNCTIONS", "ROUTINES", "TYPES", "SCHEMAS", "LARGE OBJECTS"]
)


@st.composite
def statement(draw: st.DrawFn) -> str:
    privs = ", ".join(draw(st.lists(privilege, min_size=1, max_size=3)))
    kind = draw(st.sampled_from(["grant", "revoke", "defaults", "role", "other"]))
    if kind == "grant":
        return f"{draw(prefix)}GRANT {privs} ON {draw(target)} TO {draw(grantee)}{draw(suffix)}"
    if kind == "revoke":
        return f"{draw(prefix)}REVOKE {privs} ON {draw(target)} FROM {draw(grantee)}{draw(suffix)}"
    if kind == "defaults":
        verb = draw(st.sampled_from(["GRANT", "REVOKE"]))
        to = "TO" if verb == "GRANT" else "FROM"
        return (
            f"ALTER DEFAULT PRIVILEGES {draw(default_opts)}{verb} {privs} ON "
            f"{draw(defaults_target)} {to} {draw(grantee)}{draw(suffix)}"
        )
    if kind == "role":
        return f"GRANT {draw(st.sampled_from(['pg_read_all_data', 'postgres', '{{.Role}}']))} TO {draw(grantee)}"
    return draw(
        st.sampled_from(
            ["ALTER ROLE {{.Role}} SUPERUSER", "CREATE TABLE public.x ()", "SELECT 1",
             "DO $$ BEGIN EXECUTE 'GRANT postgres TO x'; END $$", "COPY t TO PROGRAM 'id'",
             "SET ROLE postgres", "{{.User}}", "{{ if true }}x{{ end }}", "{{.Role", "GRANT {{{{.Role}}}}"]
        )
    )  # fmt: skip


@given(entry=statement(), dialect=st.sampled_from(DIALECTS))
def test_generated_statements_are_accepted_only_when_pinned_to_the_role(
    entry: str, dialect: Dialect
) -> None:
    try:
        (final,) = render_and_validate([entry], role=ROLE, database=DATABASE, dialect=dialect)
    except RawSqlError as exc:
        assert exc.index == 0 and exc.reason
        return
    assert_pinned_to_role(final, ROLE)
    if isinstance(dialect, CockroachDialect):
        assert "FOR ALL ROLES" not in final.upper()


names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=20)


@given(entry=statement(), role=names, database=names)
def test_any_role_and_database_names_stay_single_identifiers(
    entry: str, role: str, database: str
) -> None:
    # Substituted names are quoted and never re-scanned: a name holding quotes,
    # template text or SQL cannot change the statement's shape.
    try:
        (final,) = render_and_validate([entry], role=role, database=database, dialect=DIALECTS[0])
    except RawSqlError:
        return
    assert_pinned_to_role(final, role)


@given(
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    dialect=st.sampled_from(DIALECTS),
)
def test_arbitrary_text_around_the_role_gives_statements_or_raw_sql_error(
    before: str, after: str, dialect: Dialect
) -> None:
    entry = f"{before}{{{{.Role}}}}{after}"
    try:
        out = render_and_validate([entry], role=ROLE, database=DATABASE, dialect=dialect)
    except RawSqlError as exc:
        assert exc.index == 0
        return
    assert_pinned_to_role(out[0], ROLE)


@given(entries=st.lists(st.one_of(statement(), st.text(max_size=30)), min_size=1, max_size=4))
def test_one_refused_entry_refuses_the_list_and_names_it(entries: list[str]) -> None:
    try:
        out = render_and_validate(entries, role=ROLE, database=DATABASE, dialect=DIALECTS[0])
    except RawSqlError as exc:
        assert 0 <= exc.index < len(entries) and exc.entry == entries[exc.index]
        # Every entry before the refused one is acceptable on its own.
        for ok in entries[: exc.index]:
            render_and_validate([ok], role=ROLE, database=DATABASE, dialect=DIALECTS[0])
        return
    assert len(out) == len(entries)
    for final in out:
        assert_pinned_to_role(final, ROLE)


# ------------------------------------------------ regression: deep trees crashed pglast

# Found while fuzzing: pglast builds its Python AST recursively on the C stack, and a
# statement PostgreSQL's parser accepts, such as SELECT 1+1+... with ~30,000 terms,
# killed the process with SIGSEGV (a raw SQL entry in a capability rule could take the
# whole proxy down). The validator now measures the tree depth from the parser's JSON
# first. Checked in a child process, so that a regression fails this test instead of
# killing the test run.
_DEEP_SCRIPT = """
import sys
from waypoint.provision.dialect import PostgresDialect
from waypoint.provision.rawsql import RawSqlError, render_and_validate

for sql in sys.argv[1:]:
    entry = sql.replace("@", "{{.Role}}")
    try:
        render_and_validate([entry], role="r", database="d", dialect=PostgresDialect("PG", 18))
    except RawSqlError as exc:
        print("refused:", exc.reason[:60])
    else:
        print("accepted")
"""


def test_deeply_nested_statements_are_refused_without_crashing() -> None:
    import subprocess
    import sys

    deep = [
        "SELECT 1" + "+1" * 30_000,  # segfaulted in pglast.parse_sql
        "GRANT SELECT ON public.t TO @; SELECT 1" + "+1" * 29_000,
        "SELECT 'a'" + "||'a'" * 12_000,
        "SELECT " + "CASE WHEN true THEN " * 1500 + "1" + " END" * 1500,
        "GRANT SELECT ON public.t TO @ " + "-- " + "x" * 70_000,  # over the length bound
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _DEEP_SCRIPT, *deep],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"validator crashed (rc {proc.returncode}): {proc.stderr[-500:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == len(deep) and all(line.startswith("refused:") for line in lines), lines


def test_depth_bound_leaves_every_allowed_shape_accepted() -> None:
    for entry in [
        "GRANT EXECUTE ON FUNCTION api.f(integer, text, numeric(10,2)[], api.mood) TO {{.Role}}",
        "ALTER DEFAULT PRIVILEGES IN SCHEMA app, public REVOKE ALL ON FUNCTIONS FROM {{.Role}}",
        "GRANT SELECT (" + ", ".join(f"c{i}" for i in range(1600)) + ") ON public.t TO {{.Role}}",
        "GRANT SELECT ON " + ", ".join(f"s.t{i}" for i in range(500)) + " TO {{.Role}}",
    ]:
        (final,) = render_and_validate([entry], role=ROLE, database=DATABASE, dialect=DIALECTS[0])
        assert_pinned_to_role(final, ROLE)
