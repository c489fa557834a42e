"""The console's command parser: every command, case and quoting; bad input is a
ConsoleSyntaxError (42601) with the 1-based position of the fault, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.console.parser import (
    COLUMNS,
    ConsoleSyntaxError,
    Kill,
    KillLogin,
    Lock,
    Noop,
    Show,
    Unlock,
    columns_of,
    parse,
)


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("SHOW SESSIONS", Show("SESSIONS")),
        ("show sessions;", Show("SESSIONS")),
        ("  Show  Locks ; ", Show("LOCKS")),
        ("SHOW INSTANCES -- comment", Show("INSTANCES")),
        ("KILL 'ab12-3'", Kill("ab12-3")),
        ("KILL LOGIN 'o''brien@example.com'", KillLogin("o'brien@example.com")),
        ("kill login 'a@b' node 'laptop'", KillLogin("a@b", "laptop")),
        ("LOCK LOGIN 'a@b' REASON 'stolen'", Lock("a@b", None, "stolen")),
        ("LOCK LOGIN 'a@b' NODE 'n' FOR '1h30m' REASON 'r'", Lock("a@b", "n", "r", 5400.0)),
        ("UNLOCK LOGIN 'a@b'", Unlock("a@b")),
        ("UNLOCK LOGIN 'a@b' NODE 'n';", Unlock("a@b", "n")),
        ("LOCK LOGIN 'a@b' NODE ID 'nX1CNTRL' FOR '1h' REASON 'r'", Lock("a@b", None, "r", 3600.0, "nX1CNTRL")),
        ("lock login 'a@b' node id 'nX' reason 'r'", Lock("a@b", None, "r", None, "nX")),
        ("UNLOCK LOGIN 'a@b' NODE ID 'nX'", Unlock("a@b", None, "nX")),
        ("KILL LOGIN 'a@b' NODE ID 'nX'", KillLogin("a@b", None, "nX")),
        ("LOCK LOGIN 'a@b' NODE 'id' REASON 'r'", Lock("a@b", "id", "r")),
        ("SET extra_float_digits = 3", Noop("SET")),
        ("SET application_name = 'PostgreSQL JDBC Driver'", Noop("SET")),
        ("BEGIN", Noop("BEGIN")),
        ("START TRANSACTION ISOLATION LEVEL READ COMMITTED", Noop("BEGIN")),
        ("COMMIT", Noop("COMMIT")),
        ("ROLLBACK", Noop("ROLLBACK")),
        ("DISCARD ALL", Noop("DISCARD ALL")),
    ],
)
def test_commands(text: str, command: object) -> None:
    assert parse(text) == command


@pytest.mark.parametrize(
    ("text", "position", "words"),
    [
        ("", 1, "end of input"),
        ("SHOW", 5, "end of input"),
        ("SHOW SESSION", 6, '"SESSION"'),
        ("SELECT 1", 1, '"SELECT"'),
        ("KILL", 5, "a quoted connection id"),
        ("KILL LOGIN bob", 12, "a quoted login"),
        ("KILL ''", 6, "empty connection id"),
        ("KILL 'x' 'y'", 10, "end of statement"),
        ("KILL 'open", 6, "unterminated"),
        ("LOCK LOGIN 'a'", 15, "REASON"),
        ("LOCK LOGIN 'a' FOR 'soon' REASON 'x'", 20, "invalid duration"),
        ("LOCK LOGIN 'a' FOR '0s' REASON 'x'", 20, "positive"),
        ("LOCK 'a' REASON 'x'", 6, "LOGIN"),
        ("SHOW LOCKS; SHOW LOCKS", 13, "end of statement"),
        ("SHOW * FROM x", 6, '"*"'),
        ("SET", 4, "a parameter"),
        ("UNLOCK LOGIN 'a' REASON 'x'", 18, "end of statement"),
        ("LOCK LOGIN 'a' NODE ID REASON 'x'", 24, "a quoted node id"),
        ("UNLOCK LOGIN 'a' NODE ID ''", 26, "empty node id"),
        ("LOCK LOGIN 'a' NODE IDS 'n' REASON 'x'", 21, "a quoted node"),
    ],
)
def test_bad_input_names_the_position(text: str, position: int, words: str) -> None:
    with pytest.raises(ConsoleSyntaxError) as info:
        parse(text)
    assert info.value.position == position
    assert words in info.value.message


def test_long_values_and_statements_are_refused() -> None:
    with pytest.raises(ConsoleSyntaxError, match="longer than"):
        parse("KILL '" + "x" * 5000 + "'")
    with pytest.raises(ConsoleSyntaxError, match="longer than"):
        parse("SHOW SESSIONS " + " " * 20_000)


def test_columns() -> None:
    assert columns_of(Show("SESSIONS")) == COLUMNS["SESSIONS"]
    assert "statement" in COLUMNS["SESSIONS"] and "state" in COLUMNS["SESSIONS"]
    assert columns_of(Kill("x")) == ()


@given(st.text(max_size=200))
def test_any_text_parses_or_is_a_syntax_error(text: str) -> None:
    try:
        parse(text)
    except ConsoleSyntaxError as exc:
        assert 1 <= exc.position <= len(text) + 1
