"""Loading the TOML configuration (docs/configuration.md) into :class:`waypoint.config.model.Config`.

Steps: parse with tomlkit → plain Python values → ``${VAR}`` expansion per
string value → strict structuring with cattrs (no coercion; durations and
sizes through :mod:`waypoint.config.units`; unknown keys refused with a
suggestion) → cross-field validation → normalization (``grants_json`` parsed
into ``grants``). Every problem found is reported at once in one
:class:`ConfigError`, one line each, as ``FILE:LINE: key.path: message``.
Neither tomlkit items nor cattrs carry line numbers, so the line is found by
locating the key path in the source text (:class:`KeyLocator`).

:func:`waypoint.config.render.render_config` turns a Config back into TOML
(``waypoint check``); ``${VAR}`` expansion is :mod:`waypoint.config.env`, key paths and
their lines :mod:`waypoint.config.keys`.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import os
import re
import typing
import urllib.parse
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
    ListenerConfig,
    StaticIdentity,
    split_host_port,
)
from waypoint.config.secrets import FILE_KEYS, resolve_secret_files
from waypoint.config.units import (
    describe_value,
    format_duration,
    parse_duration,
    parse_share,
    parse_size,
)

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

_MAX_USER_PREFIX_BYTES = 16


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


# --------------------------------------------------------------------------- validation


def _sanitize_part(text: str) -> str:
    """The role-name sanitizing (docs/design.md), to compare listener names as they will appear."""
    return re.sub(r"[^a-z0-9]", "_", text.lower())


def _check_host_port(value: str | None, path: KeyPath, out: list[tuple[KeyPath, str]]) -> None:
    if value is None:
        return
    try:
        split_host_port(value)
    except ValueError as exc:
        out.append((path, f'{exc} (expected "host:port" or "[v6]:port")'))


def _validate_state(cfg: Config, out: list[tuple[KeyPath, str]]) -> None:
    """Where Redis is: exactly one of ``url``, ``sentinels`` and ``cluster = true``."""
    st = cfg.state
    where = [
        key
        for key, given in (
            ("url", st.url is not None),
            ("sentinels", bool(st.sentinels)),
            ("cluster", st.cluster),
        )
        if given
    ]
    if st.backend != "redis":
        for key in ("sentinels", "cluster", "nodes"):
            if getattr(st, key):
                out.append((("state", key), 'is only used with backend = "redis"'))
        return
    if not where:
        out.append(
            (
                ("state", "url"),
                'backend = "redis" requires url (e.g. "redis://127.0.0.1:6379/0"), or sentinels '
                "with service_name (Redis Sentinel), or cluster = true with nodes (Redis Cluster)",
            )
        )
    for key in where[1:]:
        out.append(
            (
                ("state", key),
                f"set only one of url, sentinels and cluster = true (found {' and '.join(where)})",
            )
        )
    mode = where[0] if where else None
    if st.url is not None:
        scheme = urllib.parse.urlsplit(st.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            out.append((("state", "url"), "must be a redis://, rediss:// or unix:// URL"))
    if mode == "url":
        for key in ("username", "password", "tls"):
            if getattr(st, key) not in (None, False):
                out.append(
                    (
                        ("state", key),
                        "is for sentinels and cluster; with url, the credentials and TLS go in "
                        'the URL ("rediss://user:password@host:6379/0")',
                    )
                )
    for key in ("username", "password", "sentinel_password", "service_name", "tls_ca_file"):
        if getattr(st, key) == "":
            out.append((("state", key), "must not be empty (leave it out instead)"))
    if st.tls_ca_file is not None and not st.tls:
        out.append((("state", "tls_ca_file"), "is only used with tls = true"))
    if st.sentinels:
        for i, address in enumerate(st.sentinels):
            _check_host_port(address, ("state", "sentinels", i), out)
        if st.service_name is None:
            out.append(
                (
                    ("state", "service_name"),
                    "sentinels needs service_name (the master's name in the Sentinel "
                    'configuration, e.g. "mymaster")',
                )
            )
    else:
        for key in ("service_name", "sentinel_password"):
            if getattr(st, key) is not None:
                out.append((("state", key), "is only used with sentinels"))
    if st.cluster:
        if not st.nodes:
            out.append(
                (
                    ("state", "nodes"),
                    'cluster = true needs nodes, a few cluster members to start from (e.g. '
                    '["10.0.2.31:6379", "10.0.2.32:6379"])',
                )
            )
        for i, address in enumerate(st.nodes):
            _check_host_port(address, ("state", "nodes", i), out)
    elif st.nodes:
        out.append((("state", "nodes"), "is only used with cluster = true"))


def _validate(cfg: Config) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []

    if cfg.handshake_timeout <= 0:
        out.append((("handshake_timeout",), "must be greater than 0s"))
    if cfg.backend_end_timeout <= 0:
        out.append((("backend_end_timeout",), "must be greater than 0s"))
    if cfg.identity.timeout <= 0:
        out.append((("identity", "timeout"), "must be greater than 0s"))
    if cfg.state.lease <= 0:
        out.append((("state", "lease"), "must be greater than 0s"))
    adm = cfg.admission
    if adm.max_handshakes_per_address <= 0:
        out.append((("admission", "max_handshakes_per_address"), "must be greater than 0"))
    if adm.cancel_burst <= 0:
        out.append((("admission", "cancel_burst"), "must be greater than 0"))
    if adm.cancel_interval <= 0:
        out.append((("admission", "cancel_interval"), "must be greater than 0s"))

    # identity
    ident = cfg.identity
    if ident.provider == "tailscale":
        if not ident.socket:
            out.append((("identity", "socket"), "must not be empty"))
        if not ident.capability:
            out.append((("identity", "capability"), "must not be empty"))
    if ident.provider == "static" and not ident.static:
        out.append(
            (
                ("identity", "static"),
                'provider = "static" needs at least one [[identity.static]] entry',
            )
        )
    for i, entry in enumerate(ident.static):
        base: KeyPath = ("identity", "static", i)
        try:
            ipaddress.ip_network(entry.cidr, strict=True)
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f" (did you mean {ipaddress.ip_network(entry.cidr, strict=False)}?)"
            out.append(((*base, "cidr"), f"invalid network {json.dumps(entry.cidr)}: {exc}{hint}"))
        if not entry.login:
            out.append(((*base, "login"), "must not be empty"))
        if not entry.node:
            out.append(((*base, "node"), "must not be empty"))
        if entry.grants and entry.grants_json is not None:
            out.append(((*base, "grants_json"), "set either grants or grants_json, not both"))
        for j, rule in enumerate(entry.grants):
            if not isinstance(rule, dict):
                out.append(
                    (
                        (*base, "grants", j),
                        f"a grant rule must be a table, got {describe_value(rule)}",
                    )
                )

    # limits
    limits = cfg.defaults.limits
    lpath: KeyPath = ("defaults", "limits")
    if limits.max_conns_total <= 0:
        out.append(((*lpath, "max_conns_total"), "must be greater than 0"))
    if limits.max_conns_per_user < 0:
        out.append(((*lpath, "max_conns_per_user"), "must not be negative (0 means no limit)"))

    # state
    _validate_state(cfg, out)
    if not cfg.state.key_prefix:
        out.append((("state", "key_prefix"), "must not be empty"))

    _check_host_port(cfg.metrics.listen, ("metrics", "listen"), out)
    if cfg.metrics.readiness_timeout <= 0:
        out.append((("metrics", "readiness_timeout"), "must be greater than 0s"))

    # audit
    audit = cfg.audit
    if audit.enabled and audit.sink == "file" and not audit.file:
        out.append((("audit", "file"), 'sink = "file" requires file (e.g. "/var/log/waypoint/audit.jsonl")'))
    if audit.max_size < 1024:
        out.append((("audit", "max_size"), "must be at least 1KiB"))
    if audit.keep < 0:
        out.append((("audit", "keep"), "must not be negative"))
    if audit.max_statement_bytes < 64:
        out.append((("audit", "max_statement_bytes"), "must be at least 64 bytes"))
    if audit.max_session_statement_bytes < 1024:
        out.append((("audit", "max_session_statement_bytes"), "must be at least 1KiB"))

    # listeners
    if not cfg.listeners:
        out.append((("listeners",), "at least one [[listeners]] table is required"))
    seen_listen: dict[str, int] = {}
    for i, lst in enumerate(cfg.listeners):
        try:
            host, port = lst.listen_address
        except ValueError:
            continue
        key = f"{host.lower()}:{port}"
        if port != 0 and key in seen_listen:
            out.append(
                (
                    ("listeners", i, "listen"),
                    f"address {lst.listen} is also used by listeners[{seen_listen[key]}]",
                )
            )
        seen_listen.setdefault(key, i)
    seen_names: dict[str, int] = {}
    seen_parts: dict[str, int] = {}
    for i, lst in enumerate(cfg.listeners):
        out.extend(_validate_listener(cfg, i, lst))
        npath: KeyPath = ("listeners", i, "name")
        if lst.name in seen_names:
            out.append(
                (
                    npath,
                    f"duplicate listener name {json.dumps(lst.name)} (also listeners[{seen_names[lst.name]}])",
                )
            )
            continue
        seen_names[lst.name] = i
        part = _sanitize_part(lst.name)
        if lst.name and part in seen_parts:
            other = cfg.listeners[seen_parts[part]].name
            out.append(
                (
                    npath,
                    f"listener names {json.dumps(other)} and {json.dumps(lst.name)} give the same"
                    f" role-name part {json.dumps(part)}; rename one",
                )
            )
        seen_parts.setdefault(part, i)
    return out


def _validate_listener(cfg: Config, i: int, lst: ListenerConfig) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    base: KeyPath = ("listeners", i)
    if not lst.name.strip():
        out.append(((*base, "name"), "must not be empty (it is part of every role name)"))
    elif lst.name != lst.name.strip():
        out.append(((*base, "name"), "must not start or end with whitespace"))
    _check_host_port(lst.listen, (*base, "listen"), out)
    _check_host_port(lst.backend, (*base, "backend"), out)
    try:
        if lst.backend_address[1] == 0:
            out.append(((*base, "backend"), "port 0 is not a valid backend port"))
    except ValueError:
        pass
    if lst.cert_file is not None and lst.key_file is None:
        out.append(((*base, "cert_file"), "cert_file is set but key_file is missing"))
    if lst.key_file is not None and lst.cert_file is None:
        out.append(((*base, "key_file"), "key_file is set but cert_file is missing"))
    if lst.tls_mode == "require" and lst.cert_file is None and not lst.use_tailscale_tls:
        out.append(
            (
                (*base, "tls_mode"),
                'tls_mode = "require" needs a certificate: set cert_file and key_file, or use_tailscale_tls = true',
            )
        )

    if not lst.console_database or len(lst.console_database.encode()) > 63:
        out.append(((*base, "console_database"), "must be 1 to 63 bytes long"))
    elif lst.console_database in ("template0", "template1", lst.postgres.admin_database):
        out.append(((*base, "console_database"), "must not name a template or the admin_database"))

    out.extend(_validate_pool(lst, base))

    pg = lst.postgres
    pbase: KeyPath = (*base, "postgres")
    if not pg.admin_user:
        out.append(((*pbase, "admin_user"), "must not be empty"))
    if not pg.admin_password:
        out.append(((*pbase, "admin_password"), "must not be empty"))
    if not pg.admin_database:
        out.append(((*pbase, "admin_database"), "must not be empty"))
    if not re.fullmatch(r"[a-z0-9_]+", pg.user_prefix):
        out.append(
            (
                (*pbase, "user_prefix"),
                f"must be non-empty and use only lowercase letters, digits and _ (got {json.dumps(pg.user_prefix)})",
            )
        )
    elif len(pg.user_prefix.encode()) > _MAX_USER_PREFIX_BYTES:
        out.append(
            ((*pbase, "user_prefix"), f"must be at most {_MAX_USER_PREFIX_BYTES} bytes long")
        )
    elif pg.user_prefix.startswith("pg_"):
        out.append(
            (
                (*pbase, "user_prefix"),
                "must not start with pg_ (PostgreSQL reserves those role names)",
            )
        )
    if pg.user_ttl <= 0:
        out.append(((*pbase, "user_ttl"), "must be greater than 0s"))
    elif pg.user_ttl < 2 * cfg.handshake_timeout:
        out.append(
            (
                (*pbase, "user_ttl"),
                f"must be at least twice handshake_timeout ({format_duration(2 * cfg.handshake_timeout)}),"
                f" got {format_duration(pg.user_ttl)}",
            )
        )
    if pg.reap_interval is not None and pg.reap_interval <= 0:
        out.append(((*pbase, "reap_interval"), "must be greater than 0s"))
    if pg.admin_idle_timeout <= 0:
        out.append(((*pbase, "admin_idle_timeout"), "must be greater than 0s"))
    if pg.reassign_to is not None:
        problem = _reassign_to_problem(pg.reassign_to, pg.admin_user, pg.user_prefix)
        if problem is not None:
            out.append(((*pbase, "reassign_to"), problem))
    return out


#: Longest ``pool_reset_query`` accepted (it is sent at every session end that pools).
_MAX_RESET_QUERY_BYTES = 4096


def _validate_pool(lst: ListenerConfig, base: KeyPath) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    for name in ("pool_idle_timeout", "pool_max_lifetime", "pool_reset_timeout"):
        if getattr(lst, name) <= 0:
            out.append(((*base, name), "must be greater than 0s"))
    if lst.pool_max_per_role < 1:
        out.append(
            ((*base, "pool_max_per_role"), "must be at least 1 (pool = false turns pooling off)")
        )
    query = lst.pool_reset_query
    if not query.strip():
        out.append(((*base, "pool_reset_query"), "must not be empty"))
    elif "\0" in query:
        out.append(((*base, "pool_reset_query"), "must not contain a NUL character"))
    elif len(query.encode()) > _MAX_RESET_QUERY_BYTES:
        out.append(
            ((*base, "pool_reset_query"), f"must be at most {_MAX_RESET_QUERY_BYTES} bytes long")
        )
    return out


# What ``reassign_to`` must be (the catalog part is checked against the server by the reaper,
# at its first pass when Waypoint starts and before every reassignment).
_REASSIGN_RULE = (
    "reassign_to must name a NOLOGIN role with none of SUPERUSER, CREATEROLE, CREATEDB, "
    "BYPASSRLS, REPLICATION and no role memberships (leave it out: roles that own objects "
    "are retired instead)"
)
_RESERVED_ROLE_NAMES = frozenset({"public", "current_user", "session_user", "current_role", "none"})


def _reassign_to_problem(target: str, admin_user: str, user_prefix: str) -> str | None:
    """Why ``reassign_to`` is refused without asking the server (None: the server decides)."""
    if not target:
        return "must not be empty (leave it out: roles that own objects are retired instead)"
    if target == admin_user:
        return (
            "must not be admin_user: a reaped caller's SECURITY DEFINER functions and views "
            f"would run with the admin's privileges; {_REASSIGN_RULE}"
        )
    if target.lower() in _RESERVED_ROLE_NAMES:
        return f"{json.dumps(target)} is not a role that can own objects; {_REASSIGN_RULE}"
    if target.startswith("pg_"):
        return (
            f"{json.dumps(target)} is a PostgreSQL predefined role (pg_*), which carries "
            f"privileges; {_REASSIGN_RULE}"
        )
    if user_prefix and target.startswith(user_prefix):
        return (
            f"{json.dumps(target)} starts with user_prefix: it would be one of Waypoint's own "
            f"roles; {_REASSIGN_RULE}"
        )
    if len(target.encode()) > 63:
        return "must be at most 63 bytes long (a PostgreSQL role name)"
    return None


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
    try:
        doc = tomlkit.parse(text)
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

    locator = KeyLocator(text)

    def problem(path: KeyPath, message: str) -> ConfigProblem:
        return ConfigProblem(source, locator.line_of(path), path, message)

    plain: dict[str, Any] = doc.unwrap()
    env_problems: list[tuple[KeyPath, str]] = []
    data = expand_tree(plain, (), env, env_problems)
    # ``admin_password_file`` and the like: read on every load, so a reload sees a rotation.
    file_values, bad_file_paths = resolve_secret_files(data, env_problems)

    cfg, problems = _structure(data)
    problems = env_problems + [(p, m) for p, m in problems if p not in bad_file_paths]
    if cfg is not None:
        cfg, grant_problems = _normalize_grants(cfg)
        bad_paths = {p for p, _ in env_problems} | bad_file_paths
        problems += [(p, m) for p, m in _validate(cfg) + grant_problems if p not in bad_paths]
    if problems:
        # A value expanded from the environment may be a secret (it may land in the wrong
        # field by mistake): messages name the variable, never its value. A value read from
        # a secret file is reported at its ``_file`` key and never quoted either.
        secrets = expanded_values(plain, env)
        for path, value in file_values.items():
            if len(value) >= 3:
                secrets.setdefault(value, f"<{FILE_KEYS[str(path[-1])]}>")
        secrets = dict(sorted(secrets.items(), key=lambda kv: -len(kv[0])))
        problems = [
            (
                (*p[:-1], FILE_KEYS[str(p[-1])]) if p in file_values else p,
                f"the value read from the file {m}" if p in file_values else m,
            )
            for p, m in problems
        ]
        found = [problem(p, scrub(m, secrets)) for p, m in problems]
        found.sort(key=lambda pr: (pr.line is None, pr.line or 0))
        raise ConfigError(found)
    assert cfg is not None
    return attrs.evolve(cfg, source=source)
