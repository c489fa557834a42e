"""Raw SQL grant validation (docs/policy.md): corpora of accepted and refused entries."""

from __future__ import annotations

import pytest

from waypoint.provision.dialect import CockroachDialect, PostgresDialect
from waypoint.provision.rawsql import RawSqlError, render, render_and_validate

PG = PostgresDialect("PostgreSQL 18.0", 18)
CRDB = CockroachDialect("CockroachDB CCL v24.1.0", 24)
ROLE = "wp_grp_perms_0123456789abcdef_app"
DB = "app"

ACCEPTED = [
    "GRANT SELECT ON public.t TO {{.Role}}",
    "GRANT SELECT ON TABLE public.t TO {{.Role}}",
    "GRANT INSERT ON public.audit_log TO {{.Role}}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON app.orders TO {{.Role}}",
    "GRANT SELECT (id, name) ON public.users TO {{.Role}}",
    "GRANT UPDATE (name) ON TABLE public.users TO {{ .Role }}",
    "GRANT ALL PRIVILEGES ON public.t TO {{.Role}}",
    "GRANT SELECT ON public.a, app.b TO {{.Role}}",
    'GRANT SELECT ON "Weird Schema"."Odd; Table" TO {{.Role}}',
    "GRANT USAGE ON SEQUENCE public.s TO {{.Role}}",
    "GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO {{.Role}}",
    "GRANT USAGE ON ALL SEQUENCES IN SCHEMA reporting TO {{.Role}}",
    "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA api TO {{.Role}}",
    "GRANT EXECUTE ON ALL PROCEDURES IN SCHEMA api TO {{.Role}}",
    "GRANT EXECUTE ON ALL ROUTINES IN SCHEMA api TO {{.Role}}",
    "GRANT EXECUTE ON FUNCTION api.do_thing(integer, text) TO {{.Role}}",
    "GRANT EXECUTE ON PROCEDURE api.run() TO {{.Role}}",
    "GRANT EXECUTE ON ROUTINE api.run TO {{.Role}}",
    "GRANT USAGE ON SCHEMA reporting TO {{.Role}}",
    "GRANT USAGE, CREATE ON SCHEMA scratch TO {{.Role}}",
    "GRANT USAGE ON TYPE public.mood TO {{.Role}}",
    "GRANT USAGE ON DOMAIN public.email TO {{.Role}}",
    "GRANT TEMPORARY ON DATABASE {{.Database}} TO {{.Role}}",
    "GRANT TEMP, CREATE ON DATABASE {{.Database}} TO {{.Role}}",
    "REVOKE DELETE ON public.audit_log FROM {{.Role}}",
    "REVOKE SELECT ON ALL TABLES IN SCHEMA secret FROM {{.Role}}",
    "REVOKE TEMPORARY ON DATABASE {{.Database}} FROM {{.Role}}",
    "REVOKE SELECT ON public.t FROM {{.Role}} RESTRICT",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {{.Role}}",
    "ALTER DEFAULT PRIVILEGES GRANT USAGE ON SEQUENCES TO {{.Role}}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA api GRANT EXECUTE ON FUNCTIONS TO {{.Role}}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA api REVOKE EXECUTE ON FUNCTIONS FROM {{.Role}}",
    "ALTER DEFAULT PRIVILEGES GRANT USAGE ON TYPES TO {{.Role}}",
    "grant select on public.t to {{.Role}};",
    "GRANT SELECT ON public.t TO {{.Role}} -- trailing comment; DROP TABLE x",
    "/* leading comment */ GRANT SELECT ON public.t TO {{.Role}}",
]

REJECTED: list[tuple[str, str]] = [
    ("GRANT SELECT ON public.t TO {{.Role}}; DROP TABLE public.t", "exactly one statement"),
    ("GRANT SELECT ON public.t TO {{.Role}};; SELECT 1", "exactly one statement"),
    ("DROP TABLE public.t", "DropStmt is not allowed"),
    ("SELECT pg_catalog.pg_sleep(10)", "SelectStmt is not allowed"),
    ("SELECT 'GRANT SELECT ON public.t TO x'", "SelectStmt is not allowed"),
    ("DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$", "DoStmt is not allowed"),
    ("COPY public.t TO '/tmp/x'", "CopyStmt is not allowed"),
    ("CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "not allowed"),
    ("ALTER ROLE {{.Role}} SUPERUSER", "AlterRoleStmt is not allowed"),
    ("SET ROLE postgres", "not allowed"),
    ("", "exactly one statement"),
    ("-- just a comment", "exactly one statement"),
    ("GRANT SELECT ON public.t TO {{.Role}} WITH GRANT OPTION", "WITH GRANT OPTION"),
    ("REVOKE GRANT OPTION FOR SELECT ON public.t FROM {{.Role}}", "GRANT OPTION"),
    ("GRANT SELECT ON public.t TO {{.Role}} GRANTED BY postgres", "GRANTED BY"),
    ("REVOKE SELECT ON public.t FROM {{.Role}} CASCADE", "CASCADE"),
    ("GRANT SELECT ON public.t TO someone_else", "grantee must be exactly"),
    ('GRANT SELECT ON public.t TO "WP_GRP_PERMS_0123456789ABCDEF_APP"', "grantee must be"),
    ("GRANT SELECT ON public.t TO PUBLIC", "PUBLIC"),
    ("GRANT SELECT ON public.t TO {{.Role}}, PUBLIC", "exactly one grantee"),
    ("GRANT SELECT ON public.t TO {{.Role}}, attacker", "exactly one grantee"),
    ("GRANT SELECT ON public.t TO CURRENT_USER", "grantee must be"),
    ("GRANT pg_read_all_data TO {{.Role}}", "role membership"),
    ("GRANT postgres TO {{.Role}}", "role membership"),
    ("REVOKE {{.Role}} FROM attacker", "role membership"),
    ("GRANT SET ON PARAMETER log_statement TO {{.Role}}", "PARAMETER"),
    ("GRANT ALTER SYSTEM ON PARAMETER shared_buffers TO {{.Role}}", "PARAMETER"),
    ("GRANT SELECT ON LARGE OBJECT 1234 TO {{.Role}}", "LARGE OBJECT"),
    ("GRANT CREATE ON TABLESPACE pg_default TO {{.Role}}", "TABLESPACE"),
    ("GRANT USAGE ON LANGUAGE plpgsql TO {{.Role}}", "LANGUAGE"),
    ("GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO {{.Role}}", "FOREIGN DATA WRAPPER"),
    ("GRANT USAGE ON FOREIGN SERVER other TO {{.Role}}", "FOREIGN SERVER"),
    ("GRANT CONNECT ON DATABASE postgres TO {{.Role}}", "client's database"),
    ("GRANT CREATE ON DATABASE other_db TO {{.Role}}", "client's database"),
    ("GRANT CONNECT ON DATABASE {{.Database}} TO {{.Role}}", "CONNECT ON DATABASE"),
    ("GRANT ALL ON DATABASE {{.Database}} TO {{.Role}}", "ALL PRIVILEGES ON DATABASE"),
    ("GRANT SELECT ON t TO {{.Role}}", "schema-qualified"),
    ("GRANT SELECT ON public.a, b TO {{.Role}}", "schema-qualified"),
    ("GRANT USAGE ON SEQUENCE s TO {{.Role}}", "schema-qualified"),
    ("GRANT EXECUTE ON FUNCTION f() TO {{.Role}}", "schema-qualified"),
    ("GRANT USAGE ON TYPE mood TO {{.Role}}", "schema-qualified"),
    ("GRANT SELECT ON otherdb.public.t TO {{.Role}}", "must not name a database"),
    (
        "ALTER DEFAULT PRIVILEGES FOR ROLE app_owner GRANT SELECT ON TABLES TO {{.Role}}",
        "FOR ROLE",
    ),
    (
        "ALTER DEFAULT PRIVILEGES FOR USER app_owner IN SCHEMA public GRANT SELECT ON TABLES TO {{.Role}}",
        "FOR ROLE",
    ),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON LARGE OBJECTS TO {{.Role}}", "LARGE OBJECTS"),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC", "PUBLIC"),
    (
        "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {{.Role}} WITH GRANT OPTION",
        "GRANT OPTION",
    ),
    ("GRANT SELECT ON public.t TO {{.User}}", "{{.User}} is not supported"),
    (
        "GRANT SELECT ON public.t TO {{.Role}}{{if .Admin}}; DROP TABLE x{{end}}",
        "no template logic",
    ),
    (
        '{{if eq .Role "x"}}GRANT SELECT ON public.t TO {{.Role}}{{else}}DROP TABLE x{{end}}',
        "no template logic",
    ),
    ('GRANT SELECT ON public.t TO {{printf "%s" .Role}}', "no template logic"),
    ("GRANT SELECT ON public.t TO {{.Role}} {{/* comment */}}", "no template logic"),
    ("GRANT SELECT ON public.t TO {{.Role", "unbalanced"),
    ("GRANT SELECT ON public.t TO .Role}}", "unbalanced"),
    ("GRANT SELEC ON public.t TO {{.Role}}", "unknown privilege"),
    ("GRANT SELECT ON public.t TO {{.Role}} ALTER", "not valid SQL"),
    ("GRANT SELECT ON public.t TO {{.Role}} /* unterminated", "not valid SQL"),
]


@pytest.mark.parametrize("entry", ACCEPTED)
def test_allowed_raw_sql_is_accepted_and_rendered_with_quoted_role(entry: str) -> None:
    (out,) = render_and_validate([entry], role=ROLE, database=DB, dialect=PG)
    assert "{{" not in out
    if "{{.Role}}" in entry or "{{ .Role }}" in entry:
        assert f'"{ROLE}"' in out


@pytest.mark.parametrize(("entry", "reason"), REJECTED)
def test_disallowed_raw_sql_is_refused_with_reason(entry: str, reason: str) -> None:
    with pytest.raises(RawSqlError) as info:
        render_and_validate([entry], role=ROLE, database=DB, dialect=PG)
    assert reason.lower() in info.value.reason.lower(), info.value.reason
    assert info.value.index == 0
    assert info.value.entry == entry


def test_corpora_are_large_enough() -> None:
    assert len(ACCEPTED) >= 25
    assert len(REJECTED) >= 25


def test_error_names_the_entry_index_and_text() -> None:
    entries = ["GRANT SELECT ON public.t TO {{.Role}}", "GRANT SELECT ON public.u TO bob"]
    with pytest.raises(RawSqlError) as info:
        render_and_validate(entries, role=ROLE, database=DB, dialect=PG)
    assert info.value.index == 1
    assert "raw SQL entry 1" in str(info.value)
    assert "public.u TO bob" in str(info.value)


def test_role_and_database_are_substituted_as_quoted_identifiers() -> None:
    out = render_and_validate(
        ["GRANT CREATE ON DATABASE {{.Database}} TO {{.Role}}"],
        role="wp_grp",
        database="select",  # a keyword: must be quoted to parse
        dialect=PG,
    )
    assert out == ['GRANT CREATE ON DATABASE "select" TO "wp_grp"']


def test_database_with_quote_is_escaped_not_injected() -> None:
    db = 'x" TO attacker; DROP TABLE t; --'
    out = render_and_validate(
        ["GRANT TEMPORARY ON DATABASE {{.Database}} TO {{.Role}}"],
        role=ROLE,
        database=db,
        dialect=PG,
    )
    assert out == [f'GRANT TEMPORARY ON DATABASE "x"" TO attacker; DROP TABLE t; --" TO "{ROLE}"']


def test_database_form_checks_exact_database_name_case() -> None:
    with pytest.raises(RawSqlError, match="client's database"):
        render_and_validate(
            ['GRANT TEMPORARY ON DATABASE "App" TO {{.Role}}'],
            role=ROLE,
            database="app",
            dialect=PG,
        )


def test_substituted_values_are_not_rescanned_as_templates() -> None:
    # A role value that looks like a template must not be expanded again.
    text = render("GRANT SELECT ON public.t TO {{.Role}}", role="{{.Database}}", database="d")
    assert text == 'GRANT SELECT ON public.t TO "{{.Database}}"'


@pytest.mark.parametrize(("role", "database"), [("", "app"), ("r\x00x", "app"), ("r", "")])
def test_an_empty_or_nul_name_is_a_refused_entry_not_sql(role: str, database: str) -> None:
    with pytest.raises(RawSqlError, match="refused"):
        render_and_validate(
            ["GRANT CONNECT ON DATABASE {{.Database}} TO {{.Role}}"],
            role=role,
            database=database,
            dialect=PG,
        )


def test_go_template_conditional_bypass_is_impossible() -> None:
    # The Go reference renders the template once with a dummy context to validate and again
    # with the real one to run, so {{if}} can choose a harmless statement for the check and
    # a malicious one for execution. Here any template construct other than the two
    # variables is refused before parsing, and validation runs on the exact final text.
    smuggle = (
        '{{if eq .Role "validator"}}GRANT SELECT ON public.t TO {{.Role}}'
        "{{else}}ALTER ROLE {{.Role}} SUPERUSER{{end}}"
    )
    for role in ("validator", ROLE):
        with pytest.raises(RawSqlError, match="no template logic"):
            render_and_validate([smuggle], role=role, database=DB, dialect=PG)


def test_for_all_roles_is_refused_in_cockroach_dialect() -> None:
    entry = "ALTER DEFAULT PRIVILEGES FOR ALL ROLES GRANT SELECT ON TABLES TO {{.Role}}"
    with pytest.raises(RawSqlError, match="FOR ALL ROLES"):
        render_and_validate([entry], role=ROLE, database=DB, dialect=CRDB)
    # PostgreSQL's own parser rejects the CockroachDB-only syntax.
    with pytest.raises(RawSqlError, match="not valid SQL"):
        render_and_validate([entry], role=ROLE, database=DB, dialect=PG)


def test_non_string_entry_is_refused() -> None:
    with pytest.raises(RawSqlError, match="must be a string"):
        render_and_validate([42], role=ROLE, database=DB, dialect=PG)  # type: ignore[list-item]


def test_rendered_text_is_the_validated_text() -> None:
    entry = "GRANT SELECT ON public.t TO {{.Role}} -- ; DROP TABLE x"
    (out,) = render_and_validate([entry], role=ROLE, database=DB, dialect=PG)
    assert out == f'GRANT SELECT ON public.t TO "{ROLE}" -- ; DROP TABLE x'


def test_touched_schemas_lists_every_schema_for_group_locks() -> None:
    from waypoint.provision.rawsql import DATABASE_LEVEL, touched_schemas

    stmts = render_and_validate(
        [
            "GRANT SELECT ON public.t, app.u TO {{.Role}}",
            "GRANT EXECUTE ON FUNCTION api.f(int) TO {{.Role}}",
            "GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO {{.Role}}",
            "GRANT USAGE ON TYPE types.mood TO {{.Role}}",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA defaults GRANT SELECT ON TABLES TO {{.Role}}",
            "GRANT TEMPORARY ON DATABASE {{.Database}} TO {{.Role}}",
        ],
        role=ROLE,
        database=DB,
        dialect=PG,
    )
    assert touched_schemas(stmts) == {
        "public", "app", "api", "reporting", "types", "defaults", DATABASE_LEVEL
    }  # fmt: skip
