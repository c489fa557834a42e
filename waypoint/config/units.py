"""Durations and sizes: the two units of the configuration and of capability grants.

Pure functions, no I/O. Durations are float seconds, sizes int bytes.

Durations are strings in the Go style: one or more ``<number><unit>`` parts with
no spaces, units ``d`` (24 h), ``h``, ``m``, ``s``, ``ms``, ``us`` (or ``µs``),
``ns``; numbers may have a decimal fraction. Examples: ``"90s"``, ``"15m"``,
``"24h"``, ``"1h30m45s"``, ``"7d"``, ``"500ms"``, ``"1.5h"``, ``"0s"``. A bare
``"0"`` is also zero. Negative durations are refused.

Sizes are non-negative integers (bytes) or strings ``<number><unit>`` with
``B``, ``KB``/``MB``/``GB``/``TB`` (powers of 1000) or ``KiB``/``MiB``/``GiB``/
``TiB`` (powers of 1024), unit names case-insensitive, one optional space
before the unit. A string of digits alone is bytes. The result must be a whole
number of bytes (``"1.5KB"`` is 1500; ``"1.5B"`` is refused).
"""

from __future__ import annotations

import decimal
import json
import re
from collections.abc import Mapping
from decimal import Decimal

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

_DURATION_UNITS: dict[str, Decimal] = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),  # micro sign, as Go accepts
    "μs": Decimal("1e-6"),  # Greek mu, as Go accepts
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}

# Longest unit names first so that "ms" is not read as "m" followed by "s".
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d)")

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?([A-Za-z]*)")

# Enough precision for any float's exact decimal expansion sum we build here.
_CONTEXT = decimal.Context(prec=80)

_DURATION_HINT = 'durations are strings like "90s", "15m", "1h30m", "7d" or "500ms"'
_SIZE_HINT = 'sizes are integers (bytes) or strings like "10GB", "512MiB" or "100B"'


def parse_duration(text: str) -> float:
    """``"1h30m"`` → ``5400.0``. Raises ValueError with a message fit for a user."""
    if not isinstance(text, str) or isinstance(text, bool):
        raise ValueError(
            f"expected a duration string, got {describe_value(text)}; {_DURATION_HINT}"
        )
    s = text
    if s == "":
        raise ValueError(f"empty duration; {_DURATION_HINT}")
    if s.startswith("-"):
        raise ValueError(f"negative duration {text!r} is not allowed")
    if s.startswith("+"):
        s = s[1:]
    if s == "0":
        return 0.0
    total = Decimal(0)
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            rest = s[pos:]
            if re.fullmatch(r"[0-9]+(?:\.[0-9]*)?", rest):
                raise ValueError(f"duration {text!r} has a number without a unit; {_DURATION_HINT}")
            raise ValueError(f"invalid duration {text!r}; {_DURATION_HINT}")
        number, unit = m.groups()
        total = _CONTEXT.add(total, _CONTEXT.multiply(Decimal(number), _DURATION_UNITS[unit]))
        pos = m.end()
    result = float(total)
    if result == float("inf"):
        raise ValueError(f"duration {text!r} is too large")
    return result


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`: ``5400.0`` → ``"1h30m"``, ``0.5`` → ``"500ms"``.

    ``parse_duration(format_duration(x)) == x`` for every finite ``x >= 0``.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"expected a number of seconds, got {describe_value(seconds)}")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"cannot format a non-finite duration {seconds!r}")
    if seconds < 0:
        raise ValueError(f"cannot format a negative duration {seconds!r}")
    # repr() is the shortest decimal that reads back as the same float.
    value = Decimal(repr(float(seconds)))
    if value == 0:
        return "0s"
    whole = int(value)
    frac = _CONTEXT.subtract(value, Decimal(whole))
    if whole == 0:
        for unit, scale in (("ms", Decimal(1000)), ("us", Decimal(10**6)), ("ns", Decimal(10**9))):
            scaled = _CONTEXT.multiply(frac, scale)
            if scaled == scaled.to_integral_value():
                return f"{int(scaled)}{unit}"
        return f"{_plain(frac)}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if frac:
        parts.append(f"{_plain(_CONTEXT.add(Decimal(secs), frac))}s")
    elif secs:
        parts.append(f"{secs}s")
    return "".join(parts)


def parse_size(value: int | str) -> int:
    """``"10GB"`` → ``10_000_000_000``, ``"1KiB"`` → ``1024``, ``42`` → ``42``.

    Raises ValueError with a message fit for a user.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {describe_value(value)}; {_SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size {value} is not allowed")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size, got {describe_value(value)}; {_SIZE_HINT}")
    s = value.strip()
    if s.startswith("-"):
        raise ValueError(f"negative size {value!r} is not allowed")
    m = _SIZE_RE.fullmatch(s)
    if m is None:
        raise ValueError(f"invalid size {value!r}; {_SIZE_HINT}")
    number, unit = m.groups()
    if unit == "":
        multiplier = 1
    else:
        found = _SIZE_UNITS.get(unit.lower())
        if found is None:
            raise ValueError(
                f"unknown size unit {unit!r} in {value!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )
        multiplier = found
    total = _CONTEXT.multiply(Decimal(number), Decimal(multiplier))
    if total != total.to_integral_value():
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(total)


def format_size(size: int) -> int | str:
    """The inverse of :func:`parse_size`: the largest unit that divides exactly.

    ``10_000_000_000`` → ``"10GB"``, ``1024`` → ``"1KiB"``, ``1500`` → ``"1500B"``,
    ``0`` → ``0`` (an integer: zero means "no limit" and reads best as a number).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"expected a non-negative integer size, got {describe_value(size)}")
    if size == 0:
        return 0
    names = {
        "tb": "TB",
        "tib": "TiB",
        "gb": "GB",
        "gib": "GiB",
        "mb": "MB",
        "mib": "MiB",
        "kb": "KB",
        "kib": "KiB",
    }
    for key, multiplier in sorted(_SIZE_UNITS.items(), key=lambda kv: -kv[1]):
        if key != "b" and size % multiplier == 0:
            return f"{size // multiplier}{names[key]}"
    return f"{size}B"


_SHARE_RE = re.compile(r"(\d+(?:\.\d+)?)%")


def parse_share(value: object) -> float:
    """``"25%"`` → ``0.25``: a share of something, written as a percentage above 0 and at
    most 100. Raises ValueError with a message fit for a user."""
    if not isinstance(value, str):
        raise ValueError(f'expected a percentage string such as "25%", got {describe_value(value)}')
    m = _SHARE_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError(f'invalid percentage {value!r}; write it as "25%" or "12.5%"')
    percent = Decimal(m.group(1))
    if not 0 < percent <= 100:
        raise ValueError(f"percentage {value!r} must be above 0% and at most 100%")
    return float(percent / 100)


def format_share(share: float) -> str:
    """The inverse of :func:`parse_share`: ``0.25`` → ``"25%"``."""
    return f"{_plain(_CONTEXT.multiply(Decimal(repr(share)), Decimal(100)))}%"


def _plain(d: Decimal) -> str:
    """A Decimal in plain positional notation without trailing zeros."""
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def json_type(value: object) -> str:
    """The JSON type of a decoded value, as a problem message names it: ``null``, ``boolean``,
    ``number``, ``string``, ``array``, ``object`` (else the Python type's name)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def describe_value(value: object) -> str:
    """A config value as a problem message names it, in TOML's terms: ``string "10"``,
    ``integer 10``, ``boolean true``, ``a table``, ``an array``."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
