"""``"console"`` in a capability rule: parsed strictly beside ``"pg"``; ``console_access`` gives the
highest level any rule grants for the listener, or a 28000 refusal."""

from __future__ import annotations

from typing import Any

import pytest

from waypoint.config.model import LimitsConfig
from waypoint.errors import Refusal
from waypoint.grants.evaluate import console_access, evaluate
from waypoint.grants.rules import RuleError, parse_rules
from waypoint.identity.model import Identity


def who(*rules: Any) -> Identity:
    return Identity("alice@example.com", "laptop", rules=tuple(rules))


def test_console_parses_beside_pg() -> None:
    parsed = parse_rules([{"backends": {"pg-main": {"console": "admin", "pg": {"databases": {"a": {"permissions": ["readonly"]}}}}}}])
    entry = parsed.rules[0].backends["pg-main"]
    assert entry.console == "admin" and entry.pg is not None
    assert parsed.warnings == ()


@pytest.mark.parametrize("value", ["write", "ADMIN", "", 1, True, None, ["admin"]])
def test_bad_console_values_are_rule_errors_naming_the_field(value: object) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules([{"backends": {"pg-main": {"console": value}}}])
    assert "console" in info.value.problems[0]


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([{"backends": {"pg-main": {"console": "read"}}}], "read"),
        ([{"backends": {"pg-main": {"console": "admin"}}}], "admin"),
        (
            [{"backends": {"pg-main": {"console": "read"}}}, {"backends": {"pg-main": {"console": "admin"}}}],
            "admin",
        ),
        ([{"backends": {"other": {"console": "admin"}}}, {"backends": {"pg-main": {"console": "read"}}}], "read"),
    ],
)
def test_console_access_is_the_highest_level_for_the_listener(rules: list[Any], expected: str) -> None:
    assert console_access(who(*rules), "pg-main") == expected


@pytest.mark.parametrize(
    "rules",
    [
        [],
        [{"backends": {"other": {"console": "admin"}}}],
        [{"backends": {"pg-main": {"pg": {"databases": {"*": {"permissions": ["readwrite"]}}}}}}],
        [{"backends": {"pg-main": {"console": "root"}}}],  # malformed: refused, never a level
    ],
)
def test_no_console_access_is_a_28000_refusal(rules: list[Any]) -> None:
    result = console_access(who(*rules), "pg-main")
    assert isinstance(result, Refusal) and result.sqlstate == "28000"


def test_console_alone_grants_no_database() -> None:
    result = evaluate(
        who({"backends": {"pg-main": {"console": "admin"}}}),
        "pg-main",
        "app",
        admin_database="postgres",
        defaults=LimitsConfig(),
        allow_raw_sql=False,
    )
    assert isinstance(result, Refusal)
