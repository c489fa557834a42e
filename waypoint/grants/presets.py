"""Preset names and the client's preset cap (docs/policy.md#presets).

A client may ask for *less* than its grant: the startup parameter
``waypoint_presets`` (alias ``waypoint_preset``), or, the form libpq clients
can actually send, ``options=-c waypoint.presets=readonly``. The strongest
preset listed is the cap; the effective preset of every granted pair is
``min(cap, granted)`` (see :mod:`waypoint.grants.evaluate`). Waypoint's own
parameters are removed before the rest is forwarded to the backend.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import attrs
from attrs import frozen

from waypoint import errors
from waypoint.errors import Refusal
from waypoint.grants.model import Preset

#: Startup parameters Waypoint reads and never forwards.
PRESET_PARAMETERS = ("waypoint_presets", "waypoint_preset")
#: ``options`` switch names (``-c NAME=VALUE`` / ``--NAME=VALUE``), compared case-insensitively.
PRESET_OPTION_NAMES = frozenset({"waypoint.presets", "waypoint.preset"})

PRESET_NAMES: tuple[str, ...] = tuple(p.label for p in Preset)

# Words people reach for, and the preset that means it.
_ALIASES: dict[str, str] = {
    "select": "readonly",
    "read": "readonly",
    "reader": "readonly",
    "ro": "readonly",
    "read-only": "readonly",
    "read_only": "readonly",
    "write": "readwrite",
    "writer": "readwrite",
    "rw": "readwrite",
    "insert": "readwrite",
    "update": "readwrite",
    "delete": "readwrite",
    "read-write": "readwrite",
    "read_write": "readwrite",
    "all": "admin",
    "owner": "admin",
    "superuser": "admin",
    "root": "admin",
    "ddl": "admin",
}


class UnknownPresetError(ValueError):
    """A preset name that is not ``readonly``, ``readwrite`` or ``admin``."""

    def __init__(self, name: str, suggestion: str | None) -> None:
        self.name = name
        self.suggestion = suggestion
        msg = f'unknown preset "{name}"'
        if suggestion is not None:
            msg += f' (did you mean "{suggestion}"?)'
        else:
            msg += f" (presets are {', '.join(PRESET_NAMES)})"
        super().__init__(msg)


def suggest_preset(name: str) -> str | None:
    """The preset a mistyped or synonymous name most likely meant, if any."""
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, PRESET_NAMES, n=1, cutoff=0.6)
    return close[0] if close else None


def preset_from_name(name: str) -> Preset:
    """``"ReadOnly"`` → :attr:`Preset.READONLY`; unknown names raise :class:`UnknownPresetError`."""
    key = name.strip().lower()
    for preset in Preset:
        if preset.label == key:
            return preset
    raise UnknownPresetError(name, suggest_preset(name))


def parse_preset_list(value: str) -> Preset:
    """A comma list of preset names → the strongest listed. Raises ValueError."""
    items = [item.strip() for item in value.split(",")]
    names = [item for item in items if item]
    if not names:
        raise ValueError("empty preset list (expected e.g. readonly)")
    return max(preset_from_name(item) for item in names)


def _normalized(value: str) -> frozenset[str]:
    return frozenset(item.strip().lower() for item in value.split(",") if item.strip())


@frozen
class PresetCapResult:
    """The cap a client asked for (None: no cap) and the parameters to forward."""

    cap: Preset | None
    forward_parameters: dict[str, str] = attrs.field(factory=dict)


# -- libpq / PostgreSQL ``options`` handling ---------------------------------

# C isspace() in the "C" locale, which pg_split_opts uses.
_C_SPACE = frozenset(" \t\n\v\f\r")


def split_options(options: str) -> list[str]:
    """Split ``options`` exactly like PostgreSQL's ``pg_split_opts``.

    Tokens are separated by unescaped whitespace; a backslash makes the next
    character literal (a trailing lone backslash is dropped).
    """
    tokens: list[str] = []
    i, n = 0, len(options)
    while i < n:
        while i < n and options[i] in _C_SPACE:
            i += 1
        if i >= n:
            break
        chars: list[str] = []
        escaped = False
        while i < n:
            ch = options[i]
            if ch in _C_SPACE and not escaped:
                break
            if not escaped and ch == "\\":
                escaped = True
            else:
                escaped = False
                chars.append(ch)
            i += 1
        tokens.append("".join(chars))
    return tokens


def join_options(tokens: list[str]) -> str:
    """The inverse of :func:`split_options`: escape backslashes and whitespace."""
    out = []
    for token in tokens:
        escaped = "".join("\\" + ch if ch == "\\" or ch in _C_SPACE else ch for ch in token)
        out.append(escaped)
    return " ".join(out)


def _waypoint_setting(assignment: str) -> str | None:
    """``"waypoint.presets=readonly"`` → ``"readonly"``; None when it is not Waypoint's."""
    name, sep, value = assignment.partition("=")
    if not sep:
        # PostgreSQL's own parser requires NAME=VALUE; without "=" it is not ours either way.
        return None
    # ParseLongOption turns '-' into '_' in the name; GUC names are case-insensitive.
    if name.replace("-", "_").strip().lower() in PRESET_OPTION_NAMES:
        return value
    return None


def extract_options_presets(options: str) -> tuple[list[str], str | None]:
    """Remove Waypoint's switches from ``options``.

    Returns (the values of every Waypoint preset switch found, the rewritten
    options or None when nothing remains). ``options`` is returned unchanged
    (byte for byte) when it holds no Waypoint switch.
    """
    tokens = split_options(options)
    kept: list[str] = []
    found: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "-c" and i + 1 < len(tokens):
            value = _waypoint_setting(tokens[i + 1])
            if value is not None:
                found.append(value)
                i += 2
                continue
            kept.extend(tokens[i : i + 2])
            i += 2
            continue
        # "-cNAME=VALUE" and "--NAME=VALUE": the assignment follows a two-character switch.
        is_switch = len(token) > 2 and token[:2] in ("-c", "--")
        value = _waypoint_setting(token[2:]) if is_switch else None
        if value is not None:
            found.append(value)
        else:
            kept.append(token)
        i += 1
    if not found:
        return [], options
    return found, (join_options(kept) if kept else None)


def parse_preset_cap(parameters: Mapping[str, str]) -> PresetCapResult | Refusal:
    """Read the client's preset cap from its startup parameters.

    Sources: ``waypoint_presets``, ``waypoint_preset`` and Waypoint switches in
    ``options``. Every source that is present must name the same presets
    (compared case-insensitively, as sets); otherwise 22023.
    """
    sources: list[tuple[str, str]] = []
    forward: dict[str, str] = {}
    for key, value in parameters.items():
        if key in PRESET_PARAMETERS:
            sources.append((key, value))
        elif key == "options":
            found, rewritten = extract_options_presets(value)
            sources.extend(("options -c waypoint.presets", v) for v in found)
            if rewritten is not None:
                forward[key] = rewritten
        else:
            forward[key] = value
    if not sources:
        return PresetCapResult(None, forward)

    first_where, first_value = sources[0]
    for where, value in sources[1:]:
        if _normalized(value) != _normalized(first_value):
            return errors.bad_preset(
                f'conflicting Waypoint preset parameters: {first_where} is "{first_value}" '
                f'but {where} is "{value}"; give one',
            )
    try:
        cap = parse_preset_list(first_value)
    except UnknownPresetError as exc:
        refusal = errors.bad_preset(f"invalid {first_where}: {exc}")
        return attrs.evolve(refusal, hint=f"presets are {', '.join(PRESET_NAMES)}")
    except ValueError as exc:
        refusal = errors.bad_preset(f"invalid {first_where}: {exc}")
        return attrs.evolve(refusal, hint=f"presets are {', '.join(PRESET_NAMES)}")
    return PresetCapResult(cap, forward)
