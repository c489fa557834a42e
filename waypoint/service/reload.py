"""What a configuration reload changes: the comparison of the running configuration with a
newly loaded one, and the hash the info metric carries.

Applied live (see docs/operations.md): listeners added, removed (they drain) or changed
(``listen`` rebinds; ``backend``, TLS settings and ``[listeners.postgres]`` apply to new
connections), ``[defaults.limits]``, ``[provisioning]``, ``[revalidation]``, the root
durations and ``[log]``. Kept until a restart: :data:`RESTART_ONLY` (the running value stays,
and the reload's log line names each such key whose value differs).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import attrs
import tomlkit

from waypoint.config.env import expanded_paths
from waypoint.config.keys import KeyPath
from waypoint.config.model import Config, ListenerConfig
from waypoint.config.render import render_config

__all__ = [
    "RESTART_ONLY",
    "Plan",
    "config_hash",
    "plan_reload",
    "provisioner_inputs_equal",
]

#: Sections and root keys that a reload cannot change while serving: the shared state store
#: (``[state]``), the identity provider (``[identity]``; but the ``[[identity.static]]``
#: entries of the static provider change live), the pre-authentication bounds
#: (``[admission]``), the metrics endpoint (``[metrics]``), the statement audit (``[audit]``:
#: its sink is opened once) and ``pid_file``.
RESTART_ONLY: tuple[str, ...] = ("state", "identity", "admission", "metrics", "audit", "pid_file")


@attrs.frozen
class Plan:
    """The difference between the running configuration and a loaded one."""

    #: The configuration to run: the loaded one, with :data:`RESTART_ONLY` kept as running.
    config: Config
    added: tuple[str, ...]
    removed: tuple[str, ...]
    #: Listeners whose settings differ (``listen`` included).
    changed: tuple[str, ...]
    #: Of ``changed``: listeners whose ``listen`` address differs (they bind anew).
    rebind: tuple[str, ...]
    #: Dotted keys whose new value is not applied until a restart.
    kept: tuple[str, ...]
    #: Root-level keys applied live whose value differs (``drain_timeout``, ``log.format``...).
    settings: tuple[str, ...]


def _differing(prefix: str, old: object, new: object) -> list[str]:
    if old == new:
        return []
    cls = type(old)
    if attrs.has(cls) and cls is type(new):
        out: list[str] = []
        for f in attrs.fields(cls):
            out += _differing(f"{prefix}.{f.name}", getattr(old, f.name), getattr(new, f.name))
        return out or [prefix]
    return [prefix]


def plan_reload(running: Config, loaded: Config) -> Plan:
    """Compare; nothing here touches the running service."""
    kept: list[str] = []
    keep: dict[str, Any] = {key: getattr(running, key) for key in RESTART_ONLY}
    if running.identity.provider == loaded.identity.provider == "static":
        # The static table is only data: a new provider serves it.
        keep["identity"] = attrs.evolve(running.identity, static=loaded.identity.static)
    for key in RESTART_ONLY:
        kept += _differing(key, keep[key], getattr(loaded, key))
    config = attrs.evolve(loaded, **keep)
    old = {lst.name: lst for lst in running.listeners}
    new = {lst.name: lst for lst in config.listeners}
    added = tuple(name for name in new if name not in old)
    removed = tuple(name for name in old if name not in new)
    changed = tuple(name for name in new if name in old and old[name] != new[name])
    rebind = tuple(name for name in changed if old[name].listen != new[name].listen)
    settings: list[str] = []
    for f in attrs.fields(Config):
        if f.name in ("listeners", "source"):
            continue
        settings += _differing(f.name, getattr(running, f.name), getattr(config, f.name))
    return Plan(config, added, removed, changed, rebind, tuple(kept), tuple(settings))


def provisioner_inputs_equal(
    a: ListenerConfig, b: ListenerConfig, a_config: Config, b_config: Config
) -> bool:
    """Whether a listener's provisioner (its admin pool, its backend, its role settings) can
    serve the other configuration unchanged."""
    return (
        a.backend == b.backend
        and a.backend_tls == b.backend_tls
        and a.backend_ca_file == b.backend_ca_file
        and a.postgres == b.postgres
        and a.mode == b.mode
        and a_config.handshake_timeout == b_config.handshake_timeout
    )


def config_hash(config: Config, expanded: Iterable[KeyPath] | None = None) -> str:
    """The SHA-256 (hex) of the effective configuration as ``waypoint check`` prints it
    (secrets and ``${VAR}`` values masked), so ``waypoint check -c FILE | sha256sum`` gives the
    same value. ``expanded``: the keys given by ``${VAR}``; by default read from the file."""
    if expanded is None:
        expanded = _expanded_of(config.source)
    text = render_config(config, mask_secrets=True, expanded=set(expanded))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _expanded_of(source: str | None) -> set[KeyPath]:
    if source is None:
        return set()
    try:
        with open(source, encoding="utf-8") as f:
            plain = tomlkit.parse(f.read()).unwrap()
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.TOMLKitError):
        return set()
    return expanded_paths(plain, os.environ)
