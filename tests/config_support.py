"""Helpers for the configuration tests: a minimal listener's TOML, loading a text, and the
problems a bad one has."""

from __future__ import annotations

import textwrap

import pytest

from waypoint.config import Config, ConfigError, ConfigProblem, load_config_text

#: The file name the texts are loaded as (it begins every problem's message).
SOURCE = "test.toml"


def listener_toml(extra: str = "") -> str:
    """A ``[[listeners]]`` table named ``pg-main`` with ``extra`` (TOML lines) before its
    ``[listeners.postgres]``."""
    return f"""\
[[listeners]]
name = "pg-main"
listen = "127.0.0.1:5432"
backend = "10.0.0.1:5432"
{extra}[listeners.postgres]
admin_user = "admin"
admin_password = "pw"
"""


LISTENER = listener_toml()


def load_text(text: str, environ: dict[str, str] | None = None) -> Config:
    """``text`` (dedented) loaded as :data:`SOURCE`, with only ``environ`` in the
    environment."""
    return load_config_text(textwrap.dedent(text), source=SOURCE, environ=environ or {})


def problems_of(text: str, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    """Every problem of ``text``, which must not load; the error's message lists them, one
    a line."""
    with pytest.raises(ConfigError) as info:
        load_text(text, environ)
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]
    return list(info.value.problems)
