"""Rendering a :class:`~waypoint.config.model.Config` back into TOML (``waypoint check``),
secrets masked."""

from __future__ import annotations

import urllib.parse
from collections.abc import Collection
from typing import Any

import attrs
import tomlkit

from waypoint.config.keys import KeyPath
from waypoint.config.load import UNIT_KEY
from waypoint.config.model import Config, MetricsConfig, PostgresListenerConfig
from waypoint.config.secrets import FILE_KEYS
from waypoint.config.units import format_duration, format_share, format_size

__all__ = ["SECRET_MASK", "render_config"]

SECRET_MASK = "********"


def _mask_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:{SECRET_MASK}@{host}"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _plain_to_item(value: Any, path: KeyPath = (), masked: _Masked | None = None) -> Any:
    """Plain JSON-like data → tomlkit inline values (tables inline, arrays of anything); a
    scalar at a masked path, or a container holding one, becomes the mask."""
    if masked is not None and masked.covers(path):
        return SECRET_MASK
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        for k, v in value.items():
            table[k] = _plain_to_item(v, (*path, k), masked)
        return table
    if isinstance(value, (list, tuple)):
        arr = tomlkit.array()
        for i, v in enumerate(value):
            arr.append(_plain_to_item(v, (*path, i), masked))
        return arr
    return value


@attrs.frozen
class _Masked:
    """Key paths whose values came from a ``${VAR}`` expansion."""

    paths: frozenset[KeyPath]

    def covers(self, path: KeyPath) -> bool:
        return path in self.paths


def _unset_note(obj: Any, name: str, root: Config, path: KeyPath, masked: _Masked) -> str:
    """What an unset optional key means, for the comment ``waypoint check`` prints."""
    if isinstance(obj, PostgresListenerConfig):
        if name == "allow_raw_sql":
            return f"not set: [provisioning] allow_raw_sql = {str(root.provisioning.allow_raw_sql).lower()} applies"
        if name == "reap_interval":
            return (
                f"not set: min(user_ttl / 4, 1h) = {format_duration(obj.effective_reap_interval)}"
            )
        if name == "reassign_to":
            return "not set: a reaped role that owns objects is retired (kept, NOLOGIN)"
    if isinstance(obj, MetricsConfig) and name == "listen":
        return "not set: no metrics endpoint"
    return "not set"


def _render_fields(
    obj: Any, table: Any, mask: bool, root: Config, path: KeyPath, masked: _Masked
) -> None:
    for f in attrs.fields(type(obj)):
        if isinstance(obj, Config) and f.name == "source":
            continue
        value = getattr(obj, f.name)
        name = f.name
        here = (*path, name)
        if attrs.has(type(value)):
            continue  # sub-tables are added after the scalar keys
        file_key = FILE_KEYS.get(name)
        if file_key is not None and getattr(obj, file_key, None) is not None:
            # Read from a file: the file is named (its key comes next), never its content.
            table.add(tomlkit.comment(f"{name}: read from {file_key}"))
            continue
        if value is None:
            table.add(tomlkit.comment(f"{name}: {_unset_note(obj, name, root, path, masked)}"))
            continue
        if isinstance(value, tuple) and value and attrs.has(type(value[0])):
            continue  # arrays of tables come last
        if masked.covers(here) or (
            mask and name in ("admin_password", "password", "sentinel_password")
        ):
            value = SECRET_MASK
        elif mask and name == "url" and isinstance(value, str):
            value = _mask_url(value)
        elif f.metadata.get(UNIT_KEY) == "size":
            value = format_size(value)
        elif f.metadata.get(UNIT_KEY) == "share":
            value = format_share(value)
        elif isinstance(value, float):
            value = format_duration(value)
        elif isinstance(value, tuple):
            value = _plain_to_item(list(value), here, masked)
        table.add(name, value)
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        if attrs.has(type(value)):
            sub = tomlkit.table()
            _render_fields(value, sub, mask, root, (*path, f.name), masked)
            table.add(f.name, sub)
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        if isinstance(value, tuple) and value and attrs.has(type(value[0])):
            aot = tomlkit.aot()
            for i, element in enumerate(value):
                sub = tomlkit.table()
                _render_fields(element, sub, mask, root, (*path, f.name, i), masked)
                aot.append(sub)
            table.add(f.name, aot)


def _derived_paths(config: Config, paths: frozenset[KeyPath]) -> frozenset[KeyPath]:
    """Paths whose values the loader derives from a masked one: the ``grants`` of a static
    identity come from its ``grants_json``."""
    extra: set[KeyPath] = set()
    for i, entry in enumerate(config.identity.static):
        base: KeyPath = ("identity", "static", i)
        if (*base, "grants_json") in paths:
            extra.update((*base, "grants", j) for j in range(len(entry.grants)))
    return paths | extra


def render_config(
    config: Config,
    *,
    mask_secrets: bool = True,
    expanded: Collection[KeyPath] = (),
) -> str:
    """The effective configuration as TOML: every key, defaults included.

    Durations and sizes are written in their string forms. With
    ``mask_secrets`` (the default) ``admin_password``, the Redis passwords of
    ``[state]`` and the password in a Redis URL are replaced by ``********``.
    Keys that are not set (no default) appear as comments. Without masking, the text loads back into
    an equal Config. Every value at a key path in ``expanded`` (where a ``${VAR}``
    was expanded: the environment may hold a secret put in the wrong field) is
    masked too, whatever the field; so is an array element or inline table
    holding one, and a ``grants`` list made from a masked ``grants_json``.
    """
    doc = tomlkit.document()
    if config.source:
        doc.add(tomlkit.comment(f"effective configuration of {config.source}"))
    masked = _Masked(_derived_paths(config, frozenset(expanded)))
    _render_fields(config, doc, mask_secrets, config, (), masked)
    return tomlkit.dumps(doc)
