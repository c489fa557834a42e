"""Parsing capability rules: types, paths in errors, unknown fields, units, preset hints."""

from __future__ import annotations

from typing import Any

import pytest

from waypoint.grants.model import Preset
from waypoint.grants.presets import UnknownPresetError, preset_from_name, suggest_preset
from waypoint.grants.rules import (
    DatabaseRule,
    RuleError,
    RuleLimits,
    parse_rules,
)

SPEC_EXAMPLE: dict[str, Any] = {
    "limits": {"max_conns": 10, "max_conn_duration": "1h", "max_bytes_per_conn": "10GB"},
    "backends": {
        "pg-main": {
            "pg": {
                "databases": {
                    "myapp": {
                        "permissions": ["readwrite"],
                        "schemas": ["public", "app"],
                        "sql": ["GRANT INSERT ON public.audit_log TO {{.Role}}"],
                    },
                    "*": {"permissions": ["readonly"]},
                }
            },
            "limits": {"max_conns": 3},
        }
    },
}


def test_spec_example_parses_into_typed_rules() -> None:
    parsed = parse_rules([SPEC_EXAMPLE])
    assert parsed.warnings == ()
    (rule,) = parsed.rules
    assert rule.limits == RuleLimits(10, 3600.0, 10_000_000_000)
    backend = rule.backends["pg-main"]
    assert backend.limits == RuleLimits(max_conns=3)
    assert backend.pg is not None
    assert backend.pg.databases["myapp"] == DatabaseRule(
        (Preset.READWRITE,),
        ("public", "app"),
        ("GRANT INSERT ON public.audit_log TO {{.Role}}",),
    )
    assert backend.pg.databases["*"] == DatabaseRule((Preset.READONLY,), ("public",), ())


def errors_of(raw: object) -> tuple[str, ...]:
    with pytest.raises(RuleError) as info:
        parse_rules(raw)
    return info.value.problems


def db(entry: Any, name: str = "myapp") -> list[Any]:
    return [{"backends": {"pg-main": {"pg": {"databases": {name: entry}}}}}]


WRONG_TYPE_CASES: list[tuple[str, object, str]] = [
    (
        "permission_item_not_a_string",
        db({"permissions": ["readonly", 3]}),
        "rules[0].backends.pg-main.pg.databases.myapp.permissions[1]: expected a string",
    ),
    (
        "permissions_is_a_string_not_an_array",
        db({"permissions": "readonly"}),
        "rules[0].backends.pg-main.pg.databases.myapp.permissions: expected an array, got a string",
    ),
    (
        "database_key_with_dot_is_quoted_in_path",
        db({"schemas": "public", "permissions": ["readonly"]}, name="my.db"),
        'rules[0].backends.pg-main.pg.databases["my.db"].schemas: expected an array',
    ),
    (
        "sql_item_not_a_string",
        db({"sql": [{"x": 1}]}),
        "rules[0].backends.pg-main.pg.databases.myapp.sql[0]: expected a string, got an object",
    ),
    ("rule_not_an_object", [1], "rules[0]: expected an object, got a number"),
    ("rules_not_an_array", {"backends": {}}, "rules: expected an array"),
    ("backends_is_an_array", [{"backends": []}], "rules[0].backends: expected an object"),
    (
        "max_conns_boolean",
        [{"limits": {"max_conns": True}}],
        "rules[0].limits.max_conns: expected a whole number, got a boolean",
    ),
    (
        "max_conns_float",
        [{"limits": {"max_conns": 2.5}}],
        "rules[0].limits.max_conns: expected a whole number, got a number",
    ),
    ("max_conns_negative", [{"limits": {"max_conns": -1}}], "rules[0].limits.max_conns: must not"),
    (
        "duration_bad_string",
        [{"limits": {"max_conn_duration": "forever"}}],
        "rules[0].limits.max_conn_duration: invalid duration",
    ),
    (
        "duration_negative_number",
        [{"limits": {"max_conn_duration": -5}}],
        "rules[0].limits.max_conn_duration: must be a finite, non-negative duration",
    ),
    (
        "size_bad_unit",
        [{"backends": {"pg-main": {"limits": {"max_bytes_per_conn": "10XB"}}}}],
        "rules[0].backends.pg-main.limits.max_bytes_per_conn: unknown size unit",
    ),
    (
        "size_array",
        [{"limits": {"max_bytes_per_conn": [1]}}],
        "rules[0].limits.max_bytes_per_conn: expected a size",
    ),
    (
        "pg_not_an_object",
        [{"backends": {"pg-main": {"pg": "yes"}}}],
        "rules[0].backends.pg-main.pg: expected an object, got a string",
    ),
    (
        "entry_grants_nothing",
        db({}),
        "rules[0].backends.pg-main.pg.databases.myapp: grants nothing",
    ),
    (
        "empty_schemas_with_permissions",
        db({"permissions": ["readonly"], "schemas": []}),
        'rules[0].backends.pg-main.pg.databases.myapp: "schemas" is empty',
    ),
    (
        "empty_sql_statement",
        db({"sql": ["  "]}),
        'rules[0].backends.pg-main.pg.databases.myapp: "sql" holds an empty statement',
    ),
    (
        "unknown_preset_with_hint",
        db({"permissions": ["select"]}),
        'permissions[0]: unknown preset "select" (did you mean "readonly"?)',
    ),
    (
        "empty_database_key",
        db({"permissions": ["readonly"]}, name=""),
        "keys must be non-empty strings",
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [c[1:] for c in WRONG_TYPE_CASES],
    ids=[c[0] for c in WRONG_TYPE_CASES],
)
def test_wrong_types_are_rejected_with_a_path(raw: object, expected: str) -> None:
    problems = errors_of(raw)
    assert any(expected in p for p in problems), problems


def test_every_bad_field_is_reported_not_only_the_first() -> None:
    problems = errors_of(
        [
            {"limits": {"max_conns": "3", "max_conn_duration": []}},
            {"backends": {"x": {"limits": {"max_bytes_per_conn": True}}}},
        ]
    )
    assert len(problems) == 3
    assert problems[0].startswith("rules[0].limits.max_conns:")
    assert problems[2].startswith("rules[1].backends.x.limits.max_bytes_per_conn:")


def test_unknown_fields_are_tolerated_and_reported_once_per_name() -> None:
    rule = {
        "comment": "hi",
        "limits": {"max_conns": 1, "max_sessions": 2},
        "backends": {
            "pg-main": {
                "comment": "again",
                "pg": {"databases": {"a": {"permissions": ["readonly"], "comment": 1}}},
            }
        },
    }
    parsed = parse_rules([rule, rule])
    assert len(parsed.rules) == 2
    assert len(parsed.warnings) == 2
    assert any('"comment"' in w for w in parsed.warnings)
    assert any('"max_sessions"' in w and 'did you mean "max_conns"' in w for w in parsed.warnings)


def test_durations_accept_strings_and_numbers_of_seconds() -> None:
    (rule,) = parse_rules([{"limits": {"max_conn_duration": "1h30m"}}]).rules
    assert rule.limits.max_conn_duration == 5400.0
    (rule,) = parse_rules([{"limits": {"max_conn_duration": 90}}]).rules
    assert rule.limits.max_conn_duration == 90.0
    (rule,) = parse_rules([{"limits": {"max_conn_duration": 1.5}}]).rules
    assert rule.limits.max_conn_duration == 1.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1234, 1234), ("10GB", 10 * 1000**3), ("512MiB", 512 * 1024**2), ("2048", 2048)],
)
def test_sizes_accept_numbers_or_strings(value: object, expected: int) -> None:
    (rule,) = parse_rules([{"limits": {"max_bytes_per_conn": value}}]).rules
    assert rule.limits.max_bytes_per_conn == expected


def test_null_pg_section_means_no_databases() -> None:
    (rule,) = parse_rules([{"backends": {"pg-main": {"pg": None}}}]).rules
    assert rule.backends["pg-main"].pg is None


@pytest.mark.parametrize(
    ("name", "preset"),
    [("readonly", Preset.READONLY), ("READWRITE", Preset.READWRITE), (" Admin ", Preset.ADMIN)],
)
def test_preset_names_are_case_insensitive(name: str, preset: Preset) -> None:
    assert preset_from_name(name) is preset


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("select", "readonly"),
        ("write", "readwrite"),
        ("all", "admin"),
        ("owner", "admin"),
        ("superuser", "admin"),
        ("readonyl", "readonly"),
        ("redwrite", "readwrite"),
        ("admn", "admin"),
        ("xyzzy", None),
    ],
)
def test_unknown_preset_hints(name: str, hint: str | None) -> None:
    assert suggest_preset(name) == hint
    with pytest.raises(UnknownPresetError) as info:
        preset_from_name(name)
    if hint is None:
        assert "presets are readonly, readwrite, admin" in str(info.value)
    else:
        assert f'did you mean "{hint}"' in str(info.value)
