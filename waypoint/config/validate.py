"""Cross-field and range validation of a structured :class:`~waypoint.config.model.Config`,
one validator per section (and per listener, its pool and its ``postgres`` table); each adds
``(key path, message)`` problems, so every problem is reported at once."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import urllib.parse

from waypoint.config.keys import KeyPath
from waypoint.config.model import (
    Config,
    ListenerConfig,
    PostgresListenerConfig,
    StateConfig,
    StaticIdentity,
    split_host_port,
)
from waypoint.config.units import describe_value, format_duration

Problems = list[tuple[KeyPath, str]]

_MAX_USER_PREFIX_BYTES = 16


def _sanitize_part(text: str) -> str:
    """The role-name sanitizing (docs/design.md), to compare listener names as they will appear."""
    return re.sub(r"[^a-z0-9]", "_", text.lower())


def _check_host_port(value: str | None, path: KeyPath, out: Problems) -> None:
    if value is None:
        return
    try:
        split_host_port(value)
    except ValueError as exc:
        out.append((path, f'{exc} (expected "host:port" or "[v6]:port")'))


def validate(cfg: Config) -> Problems:
    """Every cross-field and range problem of ``cfg``, section by section."""
    out: Problems = []
    for check in (
        _validate_timeouts,
        _validate_admission,
        _validate_identity,
        _validate_limits,
        _validate_state,
        _validate_metrics,
        _validate_audit,
        _validate_listeners,
    ):
        check(cfg, out)
    return out


def _validate_timeouts(cfg: Config, out: Problems) -> None:
    for path, value in (
        (("handshake_timeout",), cfg.handshake_timeout),
        (("backend_end_timeout",), cfg.backend_end_timeout),
        (("identity", "timeout"), cfg.identity.timeout),
        (("state", "lease"), cfg.state.lease),
    ):
        if value <= 0:
            out.append((path, "must be greater than 0s"))


def _validate_admission(cfg: Config, out: Problems) -> None:
    adm = cfg.admission
    if adm.max_handshakes_per_address <= 0:
        out.append((("admission", "max_handshakes_per_address"), "must be greater than 0"))
    if adm.cancel_burst <= 0:
        out.append((("admission", "cancel_burst"), "must be greater than 0"))
    if adm.cancel_interval <= 0:
        out.append((("admission", "cancel_interval"), "must be greater than 0s"))


def _validate_identity(cfg: Config, out: Problems) -> None:
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
        _validate_static_identity(entry, ("identity", "static", i), out)


def _validate_static_identity(entry: StaticIdentity, base: KeyPath, out: Problems) -> None:
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


def _validate_limits(cfg: Config, out: Problems) -> None:
    limits = cfg.defaults.limits
    lpath: KeyPath = ("defaults", "limits")
    if limits.max_conns_total <= 0:
        out.append(((*lpath, "max_conns_total"), "must be greater than 0"))
    if limits.max_conns_per_user < 0:
        out.append(((*lpath, "max_conns_per_user"), "must not be negative (0 means no limit)"))


def _validate_metrics(cfg: Config, out: Problems) -> None:
    _check_host_port(cfg.metrics.listen, ("metrics", "listen"), out)
    if cfg.metrics.readiness_timeout <= 0:
        out.append((("metrics", "readiness_timeout"), "must be greater than 0s"))


def _validate_audit(cfg: Config, out: Problems) -> None:
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


def _validate_listeners(cfg: Config, out: Problems) -> None:
    """Each listener, then what listeners must not share: an address, a name, the part of
    role names made from the name."""
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


def _validate_state(cfg: Config, out: Problems) -> None:
    _validate_redis(cfg.state, out)
    if not cfg.state.key_prefix:
        out.append((("state", "key_prefix"), "must not be empty"))


def _validate_redis(st: StateConfig, out: Problems) -> None:
    """Where Redis is: exactly one of ``url``, ``sentinels`` and ``cluster = true``."""
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
    _validate_redis_url(st, where[0] if where else None, out)
    for key in ("username", "password", "sentinel_password", "service_name", "tls_ca_file"):
        if getattr(st, key) == "":
            out.append((("state", key), "must not be empty (leave it out instead)"))
    if st.tls_ca_file is not None and not st.tls:
        out.append((("state", "tls_ca_file"), "is only used with tls = true"))
    _validate_sentinels(st, out)
    _validate_cluster(st, out)


def _validate_redis_url(st: StateConfig, mode: str | None, out: Problems) -> None:
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


def _validate_sentinels(st: StateConfig, out: Problems) -> None:
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


def _validate_cluster(st: StateConfig, out: Problems) -> None:
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


def _validate_listener(cfg: Config, i: int, lst: ListenerConfig) -> Problems:
    out: Problems = []
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
    _validate_postgres(cfg, lst.postgres, (*base, "postgres"), out)
    return out


def _validate_postgres(
    cfg: Config, pg: PostgresListenerConfig, pbase: KeyPath, out: Problems
) -> None:
    """A listener's ``[listeners.postgres]``: the admin login, the names and lifetimes of
    the roles Waypoint makes, the reaper."""
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


#: Longest ``pool_reset_query`` accepted (it is sent at every session end that pools).
_MAX_RESET_QUERY_BYTES = 4096


def _validate_pool(lst: ListenerConfig, base: KeyPath) -> Problems:
    out: Problems = []
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
