"""Capability rules (the JSON objects in ``Identity.rules``) as typed values (docs/policy.md).

Shape of one rule::

    {"limits": {"max_conns": 10, "max_conn_duration": "1h", "max_bytes_per_conn": "10GB"},
     "backends": {LISTENER: {"pg": {"databases": {DB_OR_*: {"permissions": [...],
                                                          "schemas": [...],
                                                          "sql": [...]}}},
                             "limits": {...},
                             "console": "read" | "admin"}}}

:func:`parse_rules` structures a list of such objects with a strict cattrs
converter. Unknown fields are tolerated and reported once per field name as
warnings (the caller logs them); a value of the wrong type is a
:class:`RuleError` whose message names the path of the field, e.g.
``rules[0].backends.pg-main.pg.databases.myapp.permissions[1]: expected a string``.

Decisions the policy format leaves open:
- ``schemas`` absent means ``["public"]``; an explicit empty list next to
  permissions is an error (the permissions would grant nothing).
- A database entry with neither ``permissions`` nor ``sql`` is an error
  ("grants nothing"): it is almost always a typo (``permission``) that would
  otherwise silently deny.
- Counts, durations and sizes must be non-negative; ``0`` means unset.
"""

from __future__ import annotations

import contextvars
import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast, get_args, get_origin

import attrs
import cattrs
from attrs import frozen
from cattrs.errors import (
    BaseValidationError,
    ClassValidationError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

from waypoint.config.units import json_type, parse_duration, parse_size
from waypoint.grants.model import Preset
from waypoint.grants.presets import preset_from_name

WILDCARD = "*"


class RuleError(ValueError):
    """The capability rules are malformed. ``problems`` has one line per bad field."""

    def __init__(self, problems: Sequence[str], warnings: Sequence[str] = ()) -> None:
        self.problems = tuple(problems)
        # Unknown fields seen while parsing: often the cause (``permission`` for ``permissions``).
        self.warnings = tuple(warnings)
        super().__init__("; ".join(self.problems))


@frozen
class RuleLimits:
    max_conns: int = 0
    max_conn_duration: float = 0.0  # seconds
    max_bytes_per_conn: int = 0


@frozen
class DatabaseRule:
    """One ``databases`` entry: every permission pairs with every schema."""

    permissions: tuple[Preset, ...] = ()
    schemas: tuple[str, ...] = ("public",)
    sql: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if not self.permissions and not self.sql:
            raise ValueError('grants nothing: give "permissions", "sql" or both')
        if self.permissions and not self.schemas:
            raise ValueError('"schemas" is empty, so "permissions" would grant nothing')
        for schema in self.schemas:
            if not schema:
                raise ValueError('"schemas" holds an empty schema name')
        for stmt in self.sql:
            if not stmt.strip():
                raise ValueError('"sql" holds an empty statement')


@frozen
class PgRule:
    databases: Mapping[str, DatabaseRule] = attrs.field(factory=dict)


@frozen
class BackendRule:
    """One ``backends`` entry, keyed by listener name."""

    pg: PgRule | None = None
    limits: RuleLimits = attrs.field(factory=RuleLimits)
    #: Access to the listener's console database: "read" (SHOW) or "admin" (also KILL, LOCK).
    console: str | None = None


@frozen
class CapabilityRule:
    limits: RuleLimits = attrs.field(factory=RuleLimits)
    backends: Mapping[str, BackendRule] = attrs.field(factory=dict)


@frozen
class ParsedRules:
    rules: tuple[CapabilityRule, ...]
    # One line per unknown field name (ignored); for the caller to log.
    warnings: tuple[str, ...] = ()


# -- the strict converter ---------------------------------------------------------

_unknown_fields: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "waypoint_rules_unknown_fields", default=None
)

_WHAT = {
    CapabilityRule: "a rule",
    RuleLimits: "limits",
    BackendRule: "a backends entry",
    PgRule: "a pg entry",
    DatabaseRule: "a databases entry",
}


def _type_name(obj: object) -> str:
    """``a string``, ``an object``, ``null``: :func:`json_type` with its article."""
    name = json_type(obj)
    if name in ("string", "number", "boolean"):
        return f"a {name}"
    if name in ("array", "object"):
        return f"an {name}"
    return name


def _structure_str(obj: object, _: type) -> str:
    if not isinstance(obj, str):
        raise TypeError(f"expected a string, got {_type_name(obj)}")
    return obj


def _structure_count(obj: object, _: type) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int):
        raise TypeError(f"expected a whole number, got {_type_name(obj)}")
    if obj < 0:
        raise ValueError("must not be negative")
    return obj


def _structure_duration(obj: object, _: type) -> float:
    if isinstance(obj, bool):
        raise TypeError("expected a duration (seconds or a string like 1h30m), got a boolean")
    if isinstance(obj, int | float):
        value = float(obj)
    elif isinstance(obj, str):
        value = parse_duration(obj)
    else:
        raise TypeError(
            f"expected a duration (seconds or a string like 1h30m), got {_type_name(obj)}"
        )
    if value < 0 or value != value or value == float("inf"):
        raise ValueError("must be a finite, non-negative duration")
    return value


def _structure_size(obj: object, _: type) -> int:
    if isinstance(obj, bool):
        raise TypeError("expected a size (bytes or a string like 10GB), got a boolean")
    if isinstance(obj, int):
        value = obj
    elif isinstance(obj, str):
        value = parse_size(obj)
    else:
        raise TypeError(f"expected a size (bytes or a string like 10GB), got {_type_name(obj)}")
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _structure_preset(obj: object, _: type) -> Preset:
    if not isinstance(obj, str):
        raise TypeError(f"expected a string, got {_type_name(obj)}")
    return preset_from_name(obj)


CONSOLE_LEVELS: tuple[str, ...] = ("read", "admin")


def _structure_console(obj: object, _: Any) -> str:
    if not isinstance(obj, str):
        raise TypeError(f"expected a string, got {_type_name(obj)}")
    if obj not in CONSOLE_LEVELS:
        raise ValueError(f'expected "read" or "admin", got {obj!r}')
    return obj


T = TypeVar("T")


# Per-field strict hooks: counts, durations (seconds or "1h30m") and sizes (bytes or "10GB").
_FIELD_HOOKS: dict[type, dict[str, Callable[[object, Any], Any]]] = {
    RuleLimits: {
        "max_conns": _structure_count,
        "max_conn_duration": _structure_duration,
        "max_bytes_per_conn": _structure_size,
    },
    BackendRule: {"console": _structure_console},
}


def _tuple_factory(cl: Any, conv: cattrs.Converter) -> Callable[[object, Any], tuple[Any, ...]]:
    args = get_args(cl)
    item_type = args[0] if args else Any
    item_hook = conv.get_structure_hook(item_type)

    def structure(obj: object, _: Any) -> tuple[Any, ...]:
        if not isinstance(obj, list | tuple):
            raise TypeError(f"expected an array, got {_type_name(obj)}")
        out: list[Any] = []
        errs: list[Exception] = []
        for i, item in enumerate(obj):
            try:
                out.append(item_hook(item, item_type))
            except Exception as exc:
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    IterableValidationNote(f"index {i}", i, item_type),
                ]
                errs.append(exc)
        if errs:
            raise IterableValidationError("invalid array", errs, cl)
        return tuple(out)

    return structure


def _mapping_factory(cl: Any, conv: cattrs.Converter) -> Callable[[object, Any], dict[str, Any]]:
    args = get_args(cl)
    value_type = args[1] if len(args) == 2 else Any
    value_hook = conv.get_structure_hook(value_type)

    def structure(obj: object, _: Any) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise TypeError(f"expected an object, got {_type_name(obj)}")
        out: dict[str, Any] = {}
        errs: list[Exception] = []
        for key, value in obj.items():
            try:
                if not isinstance(key, str) or not key:
                    raise ValueError("keys must be non-empty strings")
                out[key] = value_hook(value, value_type)
            except Exception as exc:
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    IterableValidationNote(f"key {key!r}", key, value_type),
                ]
                errs.append(exc)
        if errs:
            raise IterableValidationError("invalid object", errs, cl)
        return out

    return structure


def _class_factory(cl: type[T], conv: cattrs.Converter) -> Callable[[object, Any], T]:
    overrides = {
        name: override(struct_hook=hook) for name, hook in _FIELD_HOOKS.get(cl, {}).items()
    }
    inner = make_dict_structure_fn(cl, conv, **overrides)  # type: ignore[arg-type,unused-ignore]
    known = [a.name for a in attrs.fields(cast(Any, cl))]
    what = _WHAT.get(cl, cl.__name__)

    def structure(obj: object, _: Any) -> T:
        if not isinstance(obj, Mapping):
            raise TypeError(f"expected an object, got {_type_name(obj)}")
        unknown = _unknown_fields.get()
        for key in obj:
            if key in known:
                continue
            if unknown is not None and str(key) not in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                unknown[str(key)] = f'unknown field "{key}" in {what} ignored{hint}'
        result: T = inner(obj, cl)
        return result

    return structure


def _is_tuple(t: Any) -> bool:
    origin: Any = get_origin(t)
    return origin is tuple


def _is_mapping(t: Any) -> bool:
    origin: Any = get_origin(t)
    return origin is dict or origin is Mapping


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(Preset, _structure_preset)
    conv.register_structure_hook_factory(_is_tuple, lambda t, c=conv: _tuple_factory(t, c))
    conv.register_structure_hook_factory(_is_mapping, lambda t, c=conv: _mapping_factory(t, c))
    conv.register_structure_hook_factory(attrs.has, lambda t, c=conv: _class_factory(t, c))
    return conv


_CONVERTER = _make_converter()

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_*-]+")


def _key_path(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    text = str(key)
    if _PLAIN_KEY.fullmatch(text):
        return f"{path}.{text}"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'{path}["{escaped}"]'


def _problems(exc: BaseException, path: str) -> Iterator[str]:
    if isinstance(exc, IterableValidationError | ClassValidationError):
        for sub in exc.exceptions:
            sub_path = path
            for note in getattr(sub, "__notes__", []):
                if isinstance(note, IterableValidationNote):
                    sub_path = _key_path(path, note.index)
                elif type(note).__name__ == "AttributeValidationNote":
                    sub_path = _key_path(path, note.name)  # type: ignore[attr-defined]
            yield from _problems(sub, sub_path)
    elif isinstance(exc, BaseValidationError):  # pragma: no cover - other cattrs groups
        for sub in exc.exceptions:
            yield from _problems(sub, path)
    else:
        yield f"{path}: {exc}"


def parse_rules(raw: object, *, path: str = "rules") -> ParsedRules:
    """Structure a list of capability rule objects. Raises :class:`RuleError`."""
    if not isinstance(raw, list | tuple):
        raise RuleError([f"{path}: expected an array of rule objects, got {_type_name(raw)}"])
    unknown: dict[str, str] = {}
    token = _unknown_fields.set(unknown)
    try:
        rules: list[CapabilityRule] = []
        problems: list[str] = []
        for i, item in enumerate(raw):
            try:
                rules.append(_CONVERTER.structure(item, CapabilityRule))
            except Exception as exc:
                problems.extend(_problems(exc, f"{path}[{i}]"))
    finally:
        _unknown_fields.reset(token)
    if problems:
        raise RuleError(problems, tuple(unknown.values()))
    return ParsedRules(tuple(rules), tuple(unknown.values()))
