"""Loading the TOML configuration (docs/configuration.md) into :class:`waypoint.config.model.Config`.

Steps: parse with tomlkit → plain Python values → ``${VAR}`` expansion per
string value → strict structuring with cattrs (no coercion; durations and
sizes through :mod:`waypoint.config.units`; unknown keys refused with a
suggestion) → cross-field validation (:mod:`waypoint.config.validate`) →
normalization (``grants_json`` parsed into ``grants``). Every problem found is reported at once in one
:class:`ConfigError`, one line each, as ``FILE:LINE: key.path: message``.
Neither tomlkit items nor cattrs carry line numbers, so the line is found by
locating the key path in the source text (:class:`KeyLocator`).

:func:`waypoint.config.render.render_config` turns a Config back into TOML
(``waypoint check``); ``${VAR}`` expansion is :mod:`waypoint.config.env`, key paths and
their lines :mod:`waypoint.config.keys`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import attrs
import cattrs
import tomlkit
import tomlkit.exceptions
from attrs import frozen
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

from waypoint.config.env import expand_tree, expanded_values, scrub
from waypoint.config.keys import KeyLocator, KeyPath, format_key_path
from waypoint.config.model import (
    Config,
    IdentityConfig,
    StaticIdentity,
)
from waypoint.config.secrets import FILE_KEYS, resolve_secret_files
from waypoint.config.units import (
    describe_value,
    parse_duration,
    parse_share,
    parse_size,
)
from waypoint.config.validate import Problems, validate

__all__ = [
    "UNIT_KEY",
    "ConfigError",
    "ConfigProblem",
    "load_config",
    "load_config_text",
]

#: attrs field metadata marking an ``int`` field as a size (bytes; accepts "10GB"), or a
#: ``float`` field as a share (``"share"``: a percentage such as "25%", kept as 0.25).
#: Every other ``float`` field of the config is a duration in seconds.
UNIT_KEY = "unit"

# --------------------------------------------------------------------------- errors


@frozen
class ConfigProblem:
    """One problem in a configuration file."""

    source: str
    line: int | None
    path: KeyPath
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.path:
            return f"{where}: {format_key_path(self.path)}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid. ``str()`` lists every problem, one per line."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- strict structuring


class _Invalid(ValueError):
    """Raised by our structure hooks; the message is shown to the user as is."""


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected a boolean (true or false, unquoted), got {describe_value(value)}")
    return value


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {describe_value(value)}")
    return value


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {describe_value(value)}")
    return value


def _duration(value: Any, _: Any) -> float:
    if not isinstance(value, str):
        note = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            note = " (durations are strings with a unit; bare numbers are not accepted)"
        raise _Invalid(
            f'expected a duration string such as "90s", "15m" or "1h30m", got {describe_value(value)}{note}'
        )
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _size(value: Any, _: Any) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _share(value: Any, _: Any) -> float:
    try:
        return parse_share(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _literal(value: Any, tp: Any) -> Any:
    allowed = typing.get_args(tp)
    if value in allowed and type(value) is type(allowed[0]):
        return value
    shown = ", ".join(json.dumps(a) for a in allowed)
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
        if close:
            hint = f" (did you mean {json.dumps(close[0])}?)"
    return _raise(f"must be one of {shown}, got {describe_value(value)}{hint}")


def _raise(message: str) -> Any:
    raise _Invalid(message)


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _valid_keys(cl: type) -> list[str]:
    return [f.name for f in attrs.fields(cl) if not (cl is Config and f.name == "source")]


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _duration)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook_func(_is_literal, _literal)

    def tuple_factory(tp: Any) -> Callable[[Any, Any], Any]:
        inner = homogenous_tuple_structure_factory(tp, conv)

        def structure(value: Any, t: Any) -> Any:
            if not isinstance(value, list):
                raise _Invalid(f"expected an array, got {describe_value(value)}")
            return inner(value, t)

        return structure

    conv.register_structure_hook_factory(_is_homogeneous_tuple, tuple_factory)

    def attrs_factory(cl: Any) -> Callable[[Any, Any], Any]:
        overrides: dict[str, Any] = {}
        for f in attrs.fields(cl):
            if f.metadata.get(UNIT_KEY) == "size":
                overrides[f.name] = cattrs.override(struct_hook=_size)
            elif f.metadata.get(UNIT_KEY) == "share":
                overrides[f.name] = cattrs.override(struct_hook=_share)
        if cl is Config:
            overrides["source"] = cattrs.override(omit=True)
        inner = make_dict_structure_fn(cl, conv, **overrides)

        def structure(value: Any, t: Any) -> Any:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a table, got {describe_value(value)}")
            return inner(value, t)

        return structure

    conv.register_structure_hook_factory(attrs.has, attrs_factory)
    return conv


_CONVERTER = _make_converter()

_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]")


def _parse_cattrs_path(text: str) -> KeyPath:
    """``$.listeners[0].postgres`` → ``("listeners", 0, "postgres")``."""
    assert text.startswith("$")
    path: list[str | int] = []
    for m in _PATH_PART.finditer(text, 1):
        name, index, key = m.groups()
        if name is not None:
            path.append(name)
        elif index is not None:
            path.append(int(index))
        else:
            path.append(key)
    return tuple(path)


def _structure(data: dict[str, Any]) -> tuple[Config | None, list[tuple[KeyPath, str]]]:
    try:
        return _CONVERTER.structure(data, Config), []
    except Exception as exc:  # ClassValidationError, or a bare hook error
        captured: list[tuple[BaseException, Any]] = []

        def remember(e: BaseException, tp: Any) -> str:
            captured.append((e, tp))
            return f"#{len(captured) - 1}"

        problems: list[tuple[KeyPath, str]] = []
        for line in cattrs.transform_error(exc, path="$", format_exception=remember):
            marker, _, path_text = line.rpartition(" @ ")
            path = _parse_cattrs_path(path_text)
            err, tp = captured[int(marker[1:])]
            problems.extend(_describe_structure_error(err, tp, path))
        return None, problems


def _describe_structure_error(
    err: BaseException, tp: Any, path: KeyPath
) -> Iterator[tuple[KeyPath, str]]:
    if isinstance(err, ForbiddenExtraKeysError):
        valid = _valid_keys(err.cl)
        for key in sorted(err.extra_fields):
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            if close:
                yield (*path, key), f'unknown key (did you mean "{close[0]}"?)'
            else:
                yield (*path, key), f"unknown key; valid keys here: {', '.join(valid)}"
    elif isinstance(err, KeyError):
        if tp is not None and attrs.has(tp):
            header = ".".join(p for p in path if isinstance(p, str))
            yield path, f"required table [{header}] is missing"
        elif path and path[-1] in FILE_KEYS:
            yield path, f"required key is missing (set {path[-1]} or {FILE_KEYS[path[-1]]})"
        else:
            yield path, "required key is missing"
    elif isinstance(err, _Invalid):
        yield path, str(err)
    else:
        yield path, f"invalid value ({type(err).__name__}: {err})"


# --------------------------------------------------------------------------- normalization


def _normalize_grants(cfg: Config) -> tuple[Config, list[tuple[KeyPath, str]]]:
    """Parse every ``grants_json`` into ``grants`` (a JSON object is one rule)."""
    problems: list[tuple[KeyPath, str]] = []
    entries: list[StaticIdentity] = []
    changed = False
    for i, entry in enumerate(cfg.identity.static):
        if entry.grants_json is None or entry.grants:
            entries.append(entry)
            continue
        path: KeyPath = ("identity", "static", i, "grants_json")
        try:
            parsed = json.loads(entry.grants_json)
        except ValueError as exc:
            problems.append((path, f"invalid JSON: {exc}"))
            entries.append(entry)
            continue
        rules = [parsed] if isinstance(parsed, dict) else parsed
        if not isinstance(rules, list):
            problems.append(
                (path, f"must be a JSON array of rule objects, got {describe_value(parsed)}")
            )
            entries.append(entry)
            continue
        for j, rule in enumerate(rules):
            if not isinstance(rule, dict):
                problems.append(
                    (path, f"rule {j} must be a JSON object, got {describe_value(rule)}")
                )
        entries.append(attrs.evolve(entry, grants=tuple(rules), grants_json=None))
        changed = True
    if not changed:
        return cfg, problems
    identity: IdentityConfig = attrs.evolve(cfg.identity, static=tuple(entries))
    return attrs.evolve(cfg, identity=identity), problems


# --------------------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and validate the TOML file at ``path``. Raises :class:`ConfigError`."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            [ConfigProblem(source, None, (), f"cannot read the file: {reason}")]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [ConfigProblem(source, line, (), "the file is not valid UTF-8")]
        ) from None
    return load_config_text(text, source=source)


def load_config_text(
    text: str, *, source: str = "<string>", environ: Mapping[str, str] | None = None
) -> Config:
    """Load and validate TOML text. ``environ`` defaults to ``os.environ``.

    Raises :class:`ConfigError` listing every problem found.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    doc = _parse_toml(text, source)
    locator = KeyLocator(text)

    def problem(path: KeyPath, message: str) -> ConfigProblem:
        return ConfigProblem(source, locator.line_of(path), path, message)

    plain: dict[str, Any] = doc.unwrap()
    env_problems: Problems = []
    data = expand_tree(plain, (), env, env_problems)
    # ``admin_password_file`` and the like: read on every load, so a reload sees a rotation.
    file_values, bad_file_paths = resolve_secret_files(data, env_problems)

    cfg, problems = _structure(data)
    problems = env_problems + [(p, m) for p, m in problems if p not in bad_file_paths]
    if cfg is not None:
        cfg, grant_problems = _normalize_grants(cfg)
        bad_paths = {p for p, _ in env_problems} | bad_file_paths
        problems += [(p, m) for p, m in validate(cfg) + grant_problems if p not in bad_paths]
    if problems:
        found = [problem(p, m) for p, m in _without_secrets(problems, plain, env, file_values)]
        found.sort(key=lambda pr: (pr.line is None, pr.line or 0))
        raise ConfigError(found)
    assert cfg is not None
    return attrs.evolve(cfg, source=source)


def _parse_toml(text: str, source: str) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        message = str(exc)
        # tomlkit appends " at line L col C"; we give the line in front instead.
        message = re.sub(r" at line \d+ col \d+$", "", message)
        raise ConfigError(
            [
                ConfigProblem(
                    source, exc.line, (), f"TOML syntax error: {message} (column {exc.col})"
                )
            ]
        ) from None
    except tomlkit.exceptions.TOMLKitError as exc:
        raise ConfigError([ConfigProblem(source, None, (), f"TOML error: {exc}")]) from None


def _without_secrets(
    problems: Problems,
    plain: Mapping[str, Any],
    env: Mapping[str, str],
    file_values: Mapping[KeyPath, str],
) -> Problems:
    """``problems`` as they may be shown. A value expanded from the environment may be a
    secret (it may land in the wrong field by mistake): messages name the variable, never its
    value. A value read from a secret file is reported at its ``_file`` key and never quoted
    either."""
    secrets = expanded_values(plain, env)
    for path, value in file_values.items():
        if len(value) >= 3:
            secrets.setdefault(value, f"<{FILE_KEYS[str(path[-1])]}>")
    secrets = dict(sorted(secrets.items(), key=lambda kv: -len(kv[0])))
    return [
        (
            (*p[:-1], FILE_KEYS[str(p[-1])]) if p in file_values else p,
            scrub(f"the value read from the file {m}" if p in file_values else m, secrets),
        )
        for p, m in problems
    ]
