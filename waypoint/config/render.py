"""Rendering a :class:`~waypoint.config.model.Config` back into TOML (``waypoint check``),
secrets masked."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import attrs
import tomlkit

from waypoint.config.load import UNIT_KEY
from waypoint.config.model import Config, MetricsConfig, PostgresListenerConfig
from waypoint.config.units import format_duration, format_size

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


def _plain_to_item(value: Any) -> Any:
    """Plain JSON-like data → tomlkit inline values (tables inline, arrays of anything)."""
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        for k, v in value.items():
            table[k] = _plain_to_item(v)
        return table
    if isinstance(value, (list, tuple)):
        arr = tomlkit.array()
        for v in value:
            arr.append(_plain_to_item(v))
        return arr
    return value


def _unset_note(obj: Any, name: str, root: Config) -> str:
    """What an unset optional key means, for the comment ``waypoint check`` prints."""
    if isinstance(obj, PostgresListenerConfig):
        if name == "allow_raw_sql":
            return f"not set: [provisioning] allow_raw_sql = {str(root.provisioning.allow_raw_sql).lower()} applies"
        if name == "reap_interval":
            return (
                f"not set: min(user_ttl / 4, 1h) = {format_duration(obj.effective_reap_interval)}"
            )
        if name == "reassign_to":
            return f"not set: admin_user ({json.dumps(obj.admin_user)})"
    if isinstance(obj, MetricsConfig) and name == "listen":
        return "not set: no metrics endpoint"
    return "not set"


def _render_fields(obj: Any, table: Any, mask: bool, root: Config) -> None:
    for f in attrs.fields(type(obj)):
        if isinstance(obj, Config) and f.name == "source":
            continue
        value = getattr(obj, f.name)
        name = f.name
        if attrs.has(type(value)):
            continue  # sub-tables are added after the scalar keys
        if value is None:
            table.add(tomlkit.comment(f"{name}: {_unset_note(obj, name, root)}"))
            continue
        if isinstance(value, tuple) and value and attrs.has(type(value[0])):
            continue  # arrays of tables come last
        if mask and name in ("admin_password", "password", "sentinel_password"):
            value = SECRET_MASK
        elif mask and name == "url" and isinstance(value, str):
            value = _mask_url(value)
        elif f.metadata.get(UNIT_KEY) == "size":
            value = format_size(value)
        elif isinstance(value, float):
            value = format_duration(value)
        elif isinstance(value, tuple):
            value = _plain_to_item(list(value))
        table.add(name, value)
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        if attrs.has(type(value)):
            sub = tomlkit.table()
            _render_fields(value, sub, mask, root)
            table.add(f.name, sub)
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        if isinstance(value, tuple) and value and attrs.has(type(value[0])):
            aot = tomlkit.aot()
            for element in value:
                sub = tomlkit.table()
                _render_fields(element, sub, mask, root)
                aot.append(sub)
            table.add(f.name, aot)


def render_config(config: Config, *, mask_secrets: bool = True) -> str:
    """The effective configuration as TOML: every key, defaults included.

    Durations and sizes are written in their string forms. With
    ``mask_secrets`` (the default) ``admin_password``, the Redis passwords of
    ``[state]`` and the password in a Redis URL are replaced by ``********``. Keys that are not set (no
    default) appear as comments. Without masking, the text loads back into
    an equal Config.
    """
    doc = tomlkit.document()
    if config.source:
        doc.add(tomlkit.comment(f"effective configuration of {config.source}"))
    _render_fields(config, doc, mask_secrets, config)
    return tomlkit.dumps(doc)
