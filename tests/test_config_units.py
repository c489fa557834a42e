"""Durations and sizes (waypoint.config.units)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.config.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("1h30m", 5400.0),
        ("1h30m45s", 5445.0),
        ("7d", 604800.0),
        ("500ms", 0.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        ("2.5s", 2.5),
        (".5s", 0.5),
        ("1ms", 0.001),
        ("250us", 0.00025),
        ("3µs", 0.000003),
        ("10ns", 1e-08),
        ("1d12h", 129600.0),
        ("+5m", 300.0),
    ],
)
def test_parse_duration_accepts_go_style_strings(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("15", "number without a unit"),
        ("-5s", "negative duration"),
        ("1h 30m", "invalid duration"),
        ("", "empty duration"),
        ("h", "invalid duration"),
        ("5x", "invalid duration"),
        ("5sec", "invalid duration"),
        ("١s", "invalid duration"),  # a non-ASCII digit
    ],
)
def test_parse_duration_rejects_bad_strings(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(text)


@pytest.mark.parametrize("value", [15, 1.5, True, None])
def test_parse_duration_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration string"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (90.0, "1m30s"),
        (900.0, "15m"),
        (86400.0, "24h"),
        (5400.0, "1h30m"),
        (5445.0, "1h30m45s"),
        (0.5, "500ms"),
        (0.001, "1ms"),
        (0.00025, "250us"),
        (1e-08, "10ns"),
        (90.5, "1m30.5s"),
        (3600.25, "1h0.25s"),
        (604800.0, "168h"),
    ],
)
def test_format_duration_writes_shortest_go_style(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_format_duration_rejects_negative_and_non_finite(value: float) -> None:
    with pytest.raises(ValueError):
        format_duration(value)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_format_then_parse_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**9))
def test_format_then_parse_whole_second_durations_round_trip(seconds: int) -> None:
    text = format_duration(float(seconds))
    assert "." not in text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (42, 42),
        ("42", 42),
        ("100B", 100),
        ("1KB", 1000),
        ("10GB", 10_000_000_000),
        ("2TB", 2 * 1000**4),
        ("1KiB", 1024),
        ("512MiB", 512 * 1024**2),
        ("3GiB", 3 * 1024**3),
        ("1TiB", 1024**4),
        ("1.5KB", 1500),
        ("10 MB", 10_000_000),
        ("10gb", 10_000_000_000),
        ("1kib", 1024),
    ],
)
def test_parse_size_accepts_bytes_and_units(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "negative size"),
        ("-1KB", "negative size"),
        ("1.5B", "not a whole number of bytes"),
        ("10XB", "unknown size unit 'XB'"),
        ("abc", "invalid size"),
        ("", "invalid size"),
        (True, "expected a size"),
        (1.5, "expected a size"),
    ],
)
def test_parse_size_rejects_bad_values(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, 0),
        (10_000_000_000, "10GB"),
        (1024, "1KiB"),
        (1500, "1500B"),
        (1000, "1KB"),
        (3 * 1024**3, "3GiB"),
        (7, "7B"),
    ],
)
def test_format_size_uses_largest_exact_unit(size: int, text: int | str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=2**62))
def test_format_then_parse_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size
