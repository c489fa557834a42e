"""The per-listener pool settings: defaults, percentages, validation, ``waypoint check``."""

from __future__ import annotations

import textwrap

import pytest
from config_support import listener_toml, load_text, problems_of
from hypothesis import given
from hypothesis import strategies as st

from waypoint.config import render_config
from waypoint.config.keys import format_key_path
from waypoint.config.model import ListenerConfig
from waypoint.config.units import format_share, parse_share


def _load(extra: str) -> ListenerConfig:
    return load_text(listener_toml(textwrap.dedent(extra) + "\n")).listeners[0]


def _problems(extra: str) -> list[tuple[str, int | None, str]]:
    found = problems_of(listener_toml(textwrap.dedent(extra) + "\n"))
    return [(format_key_path(p.path), p.line, p.message) for p in found]


def test_defaults() -> None:
    lst = _load("")
    assert lst.pool is True
    assert lst.pool_idle_timeout == 60.0
    assert lst.pool_max_lifetime == 3600.0
    assert lst.pool_max_per_role == 8
    assert lst.pool_max_idle == 0.25
    assert lst.pool_reset_query == "DISCARD ALL"
    assert lst.pool_reset_timeout == 2.0


def test_every_setting_is_read() -> None:
    lst = _load(
        """
        pool = false
        pool_idle_timeout = "5m"
        pool_max_lifetime = "30m"
        pool_max_per_role = 2
        pool_max_idle = "12.5%"
        pool_reset_query = "RESET ALL; DISCARD TEMP"
        pool_reset_timeout = "500ms"
        """
    )
    assert (lst.pool, lst.pool_idle_timeout, lst.pool_max_lifetime) == (False, 300.0, 1800.0)
    assert (lst.pool_max_per_role, lst.pool_max_idle) == (2, 0.125)
    assert (lst.pool_reset_query, lst.pool_reset_timeout) == ("RESET ALL; DISCARD TEMP", 0.5)


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ("pool_max_idle = 0.25", "pool_max_idle", 'percentage string such as "25%"'),
        ('pool_max_idle = "25"', "pool_max_idle", 'write it as "25%"'),
        ('pool_max_idle = "0%"', "pool_max_idle", "above 0% and at most 100%"),
        ('pool_max_idle = "150%"', "pool_max_idle", "above 0% and at most 100%"),
        ('pool_max_idle = "-5%"', "pool_max_idle", 'write it as "25%"'),
        ('pool_idle_timeout = "0s"', "pool_idle_timeout", "greater than 0s"),
        ('pool_max_lifetime = "0s"', "pool_max_lifetime", "greater than 0s"),
        ('pool_reset_timeout = "0s"', "pool_reset_timeout", "greater than 0s"),
        ("pool_idle_timeout = 60", "pool_idle_timeout", "duration string"),
        ("pool_max_per_role = 0", "pool_max_per_role", "at least 1 (pool = false"),
        ('pool_max_per_role = "2"', "pool_max_per_role", "expected an integer"),
        ('pool = "yes"', "pool", "expected a boolean"),
        ('pool_reset_query = "  "', "pool_reset_query", "must not be empty"),
        ('pool_reset_query = "DISCARD ALL\\u0000"', "pool_reset_query", "NUL"),
        (f'pool_reset_query = "{"x" * 4097}"', "pool_reset_query", "at most 4096 bytes"),
    ],
)
def test_bad_values_are_named_with_their_line(extra: str, key: str, fragment: str) -> None:
    found = _problems(extra + "\n")
    assert len(found) == 1, found
    path, line, message = found[0]
    assert path == f"listeners[0].{key}"
    assert line == 5  # the line the key stands on
    assert fragment in message, message


def test_check_renders_the_settings_and_they_load_back() -> None:
    config = load_text(listener_toml('pool_max_idle = "12.5%"\npool_idle_timeout = "90s"\n'))
    rendered = render_config(config, mask_secrets=False)
    assert 'pool_max_idle = "12.5%"' in rendered
    assert 'pool_idle_timeout = "1m30s"' in rendered
    assert 'pool_reset_query = "DISCARD ALL"' in rendered
    assert "pool = true" in rendered
    again = load_text(rendered)
    assert again == config


@given(st.decimals(min_value="0.001", max_value="100", places=3))
def test_share_round_trips(percent: object) -> None:
    text = f"{percent}%"
    share = parse_share(text)
    assert 0 < share <= 1
    assert parse_share(format_share(share)) == share
