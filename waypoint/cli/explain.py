"""``waypoint explain``: how a capability grant evaluates for one identity (docs/policy.md).

Rules come from ``--rules FILE.json`` (an array of rule objects, one rule
object, or a whole LocalAPI whois body with ``CapMap``), else from the
``[[identity.static]]`` entry whose login and node match. Prints whether
access is granted (or the refusal the client would see), the (preset, schema)
pairs, raw SQL, merged limits, and the role and group names.

Exit status: 0 granted, 1 refused, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from waypoint.config.load import ConfigError, load_config
from waypoint.config.model import Config, ListenerConfig
from waypoint.config.units import format_duration
from waypoint.errors import Refusal
from waypoint.grants.evaluate import Evaluation, evaluate_rules
from waypoint.grants.model import EffectiveGrant, Limits, Preset
from waypoint.grants.naming import custom_group_name, group_name, role_name, validate_prefix
from waypoint.grants.presets import parse_preset_cap
from waypoint.identity.static import parse_static_grants

EXIT_GRANTED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    pass


TAKES_CONFIG = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--login", required=True, help="the caller's Tailscale login name")
    parser.add_argument("--node", required=True, help="the caller's node name")
    parser.add_argument(
        "--tags", nargs="+", action="extend", default=[], metavar="T", help="the node's tags"
    )
    parser.add_argument(
        "--listener", help="listener name (default: the only listener in the config)"
    )
    parser.add_argument("--db", required=True, metavar="D", help="the database to connect to")
    parser.add_argument(
        "--presets", metavar="P", help="preset cap as a client would send it (e.g. readonly)"
    )
    parser.add_argument(
        "--rules",
        metavar="FILE.json",
        help="capability rules: a JSON array of rule objects, or a whois body with CapMap",
    )


def _load_rules_file(path: str, capability: str) -> tuple[list[Any], str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise _UsageError(f"--rules {path}: cannot read the file: {exc.strerror}") from None
    except ValueError as exc:
        raise _UsageError(f"--rules {path}: invalid JSON: {exc}") from None
    if isinstance(data, list):
        return data, f"--rules {path}"
    if isinstance(data, dict) and "CapMap" in data:
        capmap = data["CapMap"]
        if capmap is None:
            capmap = {}
        if not isinstance(capmap, dict):
            raise _UsageError(f"--rules {path}: CapMap must be an object")
        rules = capmap.get(capability, [])
        if not isinstance(rules, list):
            raise _UsageError(f'--rules {path}: CapMap["{capability}"] must be an array')
        return rules, f'--rules {path} (whois CapMap["{capability}"])'
    if isinstance(data, dict):
        return [data], f"--rules {path} (one rule object)"
    raise _UsageError(f"--rules {path}: expected a JSON array of rule objects or a whois body")


def _static_rules(config: Config, login: str, node: str) -> tuple[list[Any], str]:
    for i, entry in enumerate(config.identity.static):
        if entry.login == login and entry.node == node:
            where = f"identity.static[{i}]"
            try:
                rules = list(parse_static_grants(entry, where))
            except ValueError as exc:
                raise _UsageError(str(exc)) from None
            return rules, f"[[identity.static]] entry {i} (cidr {entry.cidr})"
    raise _UsageError(
        f"no [[identity.static]] entry has login {login!r} and node {node!r}; "
        "pass the rules with --rules FILE.json"
    )


def _pick_listener(config: Config, name: str | None) -> ListenerConfig:
    if name is None:
        if len(config.listeners) == 1:
            return config.listeners[0]
        names = ", ".join(lst.name for lst in config.listeners) or "none"
        raise _UsageError(f"give --listener (listeners in the config: {names})")
    try:
        return config.listener(name)
    except KeyError:
        names = ", ".join(lst.name for lst in config.listeners) or "none"
        raise _UsageError(f"no listener named {name!r} (listeners: {names})") from None


def _limit_lines(limits: Limits) -> list[str]:
    def count(v: int) -> str:
        return str(v) if v else "unlimited"

    return [
        f"  max_conns for this caller (all listeners): {count(limits.max_conns_user)}",
        f"  max_conns for this caller on this listener: {count(limits.max_conns_listener)}",
        "  max_conn_duration: "
        + (format_duration(limits.max_conn_duration) if limits.max_conn_duration else "unlimited"),
        "  max_bytes_per_conn: "
        + (f"{limits.max_bytes_per_conn} bytes" if limits.max_bytes_per_conn else "unlimited"),
    ]


def _grant_lines(
    grant: EffectiveGrant, prefix: str, allow_raw_sql: bool, login: str, node: str
) -> list[str]:
    lines = ["privileges (preset, schema) through shared groups:"]
    if not grant.privileges:
        lines.append("  none")
    for pair in sorted(grant.privileges):
        group = group_name(prefix, pair.preset, pair.schema, grant.database)
        lines.append(f"  {pair.preset.label:<9} {json.dumps(pair.schema)}  group {group}")
    allowed = "allowed" if allow_raw_sql else "NOT allowed"
    lines.append(f"raw SQL grants ({allowed} on listener {grant.listener!r}):")
    if not grant.custom:
        lines.append("  none")
    for custom in grant.custom:
        group = custom_group_name(prefix, custom, grant.database)
        pairs = ", ".join(
            f"{p.preset.label} {json.dumps(p.schema)}" for p in sorted(custom.privileges)
        )
        lines.append(f"  group {group} (presets: {pairs or 'none'})")
        lines.extend(f"    {stmt}" for stmt in custom.sql)
    lines.append("limits:")
    lines.extend(_limit_lines(grant.limits))
    name = role_name(prefix, grant.listener, login, node, grant.database, grant.preset_cap)
    lines.append(f"role: {name}")
    return lines


def _refusal_lines(refusal: Refusal) -> list[str]:
    lines = [f"result: REFUSED {refusal.sqlstate}: {refusal.message}"]
    if refusal.hint:
        lines.append(f"hint: {refusal.hint}")
    if refusal.detail:
        lines.append(f"detail (log only): {refusal.detail}")
    return lines


def explain(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config)
    listener = _pick_listener(config, args.listener)
    if args.rules is not None:
        rules, source = _load_rules_file(args.rules, config.identity.capability)
    else:
        rules, source = _static_rules(config, args.login, args.node)
    allow_raw_sql = config.allow_raw_sql(listener)
    prefix = listener.postgres.user_prefix
    problem = validate_prefix(prefix)
    if problem is not None:
        raise _UsageError(f"listener {listener.name!r}: {problem}")

    def emit(line: str) -> None:
        print(line, file=out)

    tags = ", ".join(args.tags) if args.tags else "none"
    emit(f"identity: login {args.login!r}, node {args.node!r}, tags: {tags}")
    emit(f"listener: {listener.name!r}, database: {args.db!r}")
    emit(f"rules: {len(rules)} from {source}")

    cap: Preset | None = None
    if args.presets is not None:
        capped = parse_preset_cap({"waypoint_presets": args.presets})
        if isinstance(capped, Refusal):
            for line in _refusal_lines(capped):
                emit(line)
            return EXIT_REFUSED
        cap = capped.cap
    emit(f"preset cap: {cap.label if cap is not None else 'none'}")

    def evaluate(raw_sql: bool) -> Evaluation:
        return evaluate_rules(
            rules,
            listener.name,
            args.db,
            admin_database=listener.postgres.admin_database,
            defaults=config.defaults.limits,
            preset_cap=cap,
            allow_raw_sql=raw_sql,
        )

    evaluation = evaluate(allow_raw_sql)
    for warning in evaluation.warnings:
        emit(f"warning: {warning}")
    result = evaluation.result
    if isinstance(result, Refusal):
        for line in _refusal_lines(result):
            emit(line)
        if not allow_raw_sql:
            # Show what the grant holds, so the operator sees which raw SQL is in the way.
            would_be = evaluate(True).result
            if isinstance(would_be, EffectiveGrant) and would_be.has_raw_sql:
                emit("the grant would hold, if allow_raw_sql were on:")
                for line in _grant_lines(would_be, prefix, True, args.login, args.node):
                    emit("  " + line)
        return EXIT_REFUSED
    emit("result: GRANTED")
    for line in _grant_lines(result, prefix, allow_raw_sql, args.login, args.node):
        emit(line)
    return EXIT_GRANTED


def run(args: argparse.Namespace) -> int:
    try:
        return explain(args, sys.stdout)
    except ConfigError as exc:
        print(f"waypoint explain: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except _UsageError as exc:
        print(f"waypoint explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
