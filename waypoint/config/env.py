"""``${VAR}`` expansion of configuration string values, finding where it happened (so that
``waypoint check`` masks those values), and scrubbing the expanded values out of messages."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from waypoint.config.keys import KeyPath

__all__ = ["expand_env", "expand_tree", "expanded_paths", "expanded_values", "scrub"]


_ENV_TOKEN = re.compile(r"\$\$\{|\$\{(?P<name>[^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(value: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand ``${VAR}`` in one string value; ``$${`` is a literal ``${``.

    Returns the expanded text and a list of problems (missing or malformed
    variables; those occurrences are left as written). A ``$`` not followed
    by ``{`` is kept as it is.
    """
    out: list[str] = []
    problems: list[str] = []
    pos = 0
    for m in _ENV_TOKEN.finditer(value):
        out.append(value[pos : m.start()])
        token = m.group(0)
        name = m.group("name")
        if token == "$${":
            out.append("${")
        elif name is None:
            problems.append("unterminated ${ (write $${ for a literal ${)")
            out.append(token)
        elif not _ENV_NAME.fullmatch(name):
            problems.append(f"invalid environment variable name ${{{name}}}")
            out.append(token)
        elif name not in environ:
            problems.append(f"environment variable {name} is not set")
            out.append(token)
        else:
            out.append(environ[name])
        pos = m.end()
    out.append(value[pos:])
    return "".join(out), problems


def expand_tree(
    value: Any, path: KeyPath, environ: Mapping[str, str], problems: list[tuple[KeyPath, str]]
) -> Any:
    if isinstance(value, str):
        expanded, errs = expand_env(value, environ)
        problems.extend((path, e) for e in errs)
        return expanded
    if isinstance(value, dict):
        return {k: expand_tree(v, (*path, k), environ, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_tree(v, (*path, i), environ, problems) for i, v in enumerate(value)]
    return value


def expanded_paths(value: Any, environ: Mapping[str, str], path: KeyPath = ()) -> set[KeyPath]:
    """Key paths of the string values in which a ``${VAR}`` expands (``$${`` does not)."""
    if isinstance(value, str):
        expands = any(
            (name := m.group("name")) is not None
            and _ENV_NAME.fullmatch(name) is not None
            and name in environ
            for m in _ENV_TOKEN.finditer(value)
        )
        return {path} if expands else set()
    found: set[KeyPath] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            found |= expanded_paths(v, environ, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found |= expanded_paths(v, environ, (*path, i))
    return found


def expanded_values(value: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment values that ``${VAR}`` references in ``value`` expand to (value → ``${VAR}``),
    longest first; values shorter than 3 characters are not worth hiding and would garble text."""
    found: dict[str, str] = {}

    def walk(v: Any) -> None:
        if isinstance(v, str):
            for m in _ENV_TOKEN.finditer(v):
                name = m.group("name")
                if name and name in environ and len(environ[name]) >= 3:
                    found.setdefault(environ[name], f"${{{name}}}")
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(value)
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def scrub(message: str, values: Mapping[str, str]) -> str:
    for secret, placeholder in values.items():
        for form in (secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]):
            if form:
                message = message.replace(form, placeholder)
    return message
