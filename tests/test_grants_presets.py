"""The client's preset cap: startup parameters and libpq ``options`` (docs/policy.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.errors import Refusal
from waypoint.grants.model import Preset
from waypoint.grants.presets import (
    PresetCapResult,
    join_options,
    parse_preset_cap,
    split_options,
)


def ok(params: dict[str, str]) -> PresetCapResult:
    result = parse_preset_cap(params)
    assert isinstance(result, PresetCapResult), result
    return result


def bad(params: dict[str, str]) -> Refusal:
    result = parse_preset_cap(params)
    assert isinstance(result, Refusal), result
    assert result.sqlstate == "22023"
    return result


BASE = {"user": "alice", "database": "app", "application_name": "psql"}

CAP_CASES: list[tuple[str, dict[str, str], Preset | None, dict[str, str]]] = [
    ("no_waypoint_parameters_no_cap", {}, None, {}),
    ("waypoint_presets_parameter", {"waypoint_presets": "readonly"}, Preset.READONLY, {}),
    ("waypoint_preset_alias", {"waypoint_preset": "ReadWrite"}, Preset.READWRITE, {}),
    (
        "both_parameters_with_same_value",
        {"waypoint_presets": "readonly", "waypoint_preset": "READONLY"},
        Preset.READONLY,
        {},
    ),
    (
        "comma_list_strongest_is_the_cap",
        {"waypoint_presets": "readonly, admin ,readwrite"},
        Preset.ADMIN,
        {},
    ),
    (
        "options_dash_c_separate_switch_dropped_entirely",
        {"options": "-c waypoint.presets=readonly"},
        Preset.READONLY,
        {},
    ),
    (
        "options_dash_c_joined",
        {"options": "-cwaypoint.presets=readwrite"},
        Preset.READWRITE,
        {},
    ),
    (
        "options_double_dash",
        {"options": "--waypoint.presets=admin"},
        Preset.ADMIN,
        {},
    ),
    (
        "options_singular_name_and_case",
        {"options": "-c Waypoint.Preset=readonly"},
        Preset.READONLY,
        {},
    ),
    (
        "options_other_switches_kept",
        {"options": "-c statement_timeout=5s -c waypoint.presets=readonly --search_path=app"},
        Preset.READONLY,
        {"options": "-c statement_timeout=5s --search_path=app"},
    ),
    (
        "options_escaped_space_in_other_value_stays_escaped",
        {"options": r"-c application_name=my\ app -c waypoint.presets=readonly"},
        Preset.READONLY,
        {"options": r"-c application_name=my\ app"},
    ),
    (
        "options_escaped_space_inside_waypoint_list",
        {"options": r"-c waypoint.presets=readonly,\ readwrite"},
        Preset.READWRITE,
        {},
    ),
    (
        "options_without_waypoint_switch_forwarded_byte_for_byte",
        {"options": "  -c  geqo=off\t"},
        None,
        {"options": "  -c  geqo=off\t"},
    ),
    (
        "options_and_parameter_agree",
        {"options": "-c waypoint.presets=readonly", "waypoint_presets": "readonly"},
        Preset.READONLY,
        {},
    ),
    (
        "trailing_dash_c_without_argument_is_kept",
        {"options": "-c waypoint.presets=readonly -c"},
        Preset.READONLY,
        {"options": "-c"},
    ),
    (
        "similar_but_foreign_setting_is_not_ours",
        {"options": "-c waypoint.presetsx=admin"},
        None,
        {"options": "-c waypoint.presetsx=admin"},
    ),
]


@pytest.mark.parametrize(
    ("params", "cap", "forward"),
    [c[1:] for c in CAP_CASES],
    ids=[c[0] for c in CAP_CASES],
)
def test_preset_cap(params: dict[str, str], cap: Preset | None, forward: dict[str, str]) -> None:
    result = ok({**BASE, **params})
    assert result.cap is cap
    assert result.forward_parameters == {**BASE, **forward}


def test_conflicting_waypoint_presets_and_alias_refused_22023() -> None:
    r = bad({"waypoint_presets": "readonly", "waypoint_preset": "admin"})
    assert "conflicting" in r.message


def test_conflicting_options_and_parameter_refused_22023() -> None:
    bad({"waypoint_presets": "readonly", "options": "-c waypoint.presets=readwrite"})


def test_unknown_preset_refused_22023_with_did_you_mean() -> None:
    r = bad({"waypoint_presets": "select"})
    assert 'did you mean "readonly"' in r.message
    assert r.hint is not None


def test_empty_preset_list_refused_22023() -> None:
    bad({"waypoint_presets": " , "})


def test_unknown_preset_in_options_refused_22023() -> None:
    r = bad({"options": "-c waypoint.presets=write"})
    assert 'did you mean "readwrite"' in r.message


@pytest.mark.parametrize(
    ("options", "tokens"),
    [
        ("", []),
        ("   ", []),
        ("-c a=b", ["-c", "a=b"]),
        (r"-c a=x\ y", ["-c", "a=x y"]),
        (r"a\\b", [r"a\b"]),
        ("a\tb\nc", ["a", "b", "c"]),
        ("ab\\", ["ab"]),  # a trailing lone backslash is dropped, as pg_split_opts does
        (r"\ lead", [" lead"]),
    ],
)
def test_split_options_matches_pg_split_opts(options: str, tokens: list[str]) -> None:
    assert split_options(options) == tokens


@given(st.lists(st.text(min_size=1), max_size=6))
def test_join_then_split_options_round_trips(tokens: list[str]) -> None:
    assert split_options(join_options(tokens)) == tokens
