"""Capability rules + listener + database (+ preset cap) → EffectiveGrant or Refusal (docs/policy.md).

Semantics:
- A rule applies when its ``backends`` has this listener. No rule applies:
  ``28000`` (not authorized for the listener).
- Per applying rule: the exact database entry if present, else ``*``. The
  wildcard covers only databases **not listed in that rule**; another rule's
  ``*`` still applies. Results are united across rules.
- Pairs stay paired per entry: every permission of an entry pairs with every
  schema of that entry, never with another rule's schemas (no flattening).
  All pairs are kept (readonly and readwrite on one schema both stay), so no
  information is lost; provisioning grants each pair's group.
- An entry with ``sql`` becomes a :class:`CustomGrant` carrying its own pairs
  and SQL; those pairs are **not** also in ``privileges`` (the private group
  carries both, so REVOKE in its SQL carves holes in its own presets).
- Preset cap: every pair's preset becomes ``min(cap, granted)`` (never
  elevates); all raw SQL is dropped and custom grants turn into plain capped
  pairs. Nothing left after the cap: ``42501``.
- Raw SQL left and ``allow_raw_sql`` false: ``42501``.
- Limits: per field the strictest positive value across the applying rules'
  top-level and listener-level ``limits`` and ``[defaults.limits]``; 0 is
  unset. Rules that do not mention this listener contribute no limits.
- Reserved databases: ``template0``, ``template1`` and the listener's
  ``admin_database`` (where Waypoint's locks live) are never granted, whether
  a rule names them or ``*`` would cover them: ``42501`` with the reason.
- A database name longer than PostgreSQL's 63 bytes (``NAMEDATALEN - 1``) is
  refused with ``42622``: the server would cut it to another name, so a grant
  evaluated on the name as sent would not be the grant of the database used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from attrs import frozen

from waypoint import errors
from waypoint.config.model import LimitsConfig
from waypoint.errors import Refusal
from waypoint.grants.model import CustomGrant, EffectiveGrant, Limits, Preset, SchemaPrivilege
from waypoint.grants.rules import WILDCARD, ParsedRules, RuleError, parse_rules
from waypoint.identity.model import Identity
from waypoint.lru import LRU

MAX_DATABASE_NAME_BYTES: Final = 63
TEMPLATE_DATABASES: Final = frozenset({"template0", "template1"})


def reserved_databases(admin_database: str) -> frozenset[str]:
    """The databases no grant reaches: the templates and the listener's ``admin_database``."""
    return TEMPLATE_DATABASES | {admin_database}


def _database_refusal(
    parsed: ParsedRules, listener: str, database: str, admin_database: str
) -> Refusal | None:
    """Why ``database`` can never be granted on ``listener``, or None."""
    size = len(database.encode("utf-8", "surrogatepass"))
    if size > MAX_DATABASE_NAME_BYTES:
        return errors.database_name_too_long(database, size, MAX_DATABASE_NAME_BYTES)
    if database in reserved_databases(admin_database):
        named = any(
            backend.pg is not None and database in backend.pg.databases
            for rule in parsed.rules
            if (backend := rule.backends.get(listener)) is not None
        )
        what = "the admin database" if database == admin_database else "a template database"
        return errors.reserved_database(
            database,
            listener,
            what,
            detail=(
                "a rule names it explicitly; Waypoint never grants it"
                if named
                else '"*" never covers it'
            ),
        )
    return None


@frozen
class Evaluation:
    """The outcome plus the parse warnings (unknown fields) the caller should log."""

    result: EffectiveGrant | Refusal
    warnings: tuple[str, ...] = ()


def _strictest(values: Iterable[float]) -> float:
    positive = [v for v in values if v > 0]
    return min(positive) if positive else 0


def _pairs(permissions: Iterable[Preset], schemas: Iterable[str]) -> frozenset[SchemaPrivilege]:
    schema_list = tuple(schemas)
    return frozenset(SchemaPrivilege(p, s) for p in permissions for s in schema_list)


def _cap(pairs: Iterable[SchemaPrivilege], cap: Preset) -> frozenset[SchemaPrivilege]:
    return frozenset(SchemaPrivilege(min(cap, pair.preset), pair.schema) for pair in pairs)


def _custom_sort_key(c: CustomGrant) -> tuple[tuple[tuple[int, str], ...], tuple[str, ...]]:
    return tuple((int(p.preset), p.schema) for p in sorted(c.privileges)), c.sql


def evaluate_parsed(
    parsed: ParsedRules,
    listener: str,
    database: str,
    *,
    admin_database: str,
    defaults: LimitsConfig,
    preset_cap: Preset | None = None,
    allow_raw_sql: bool,
) -> EffectiveGrant | Refusal:
    """Evaluate already-parsed rules (see the module docstring for the semantics)."""
    matched_listener = False
    privileges: set[SchemaPrivilege] = set()
    custom: set[CustomGrant] = set()
    rule_conns: list[int] = [defaults.max_conns_per_user]
    listener_conns: list[int] = []
    durations: list[float] = [defaults.max_conn_duration]
    sizes: list[int] = [defaults.max_bytes_per_conn]

    for rule in parsed.rules:
        backend = rule.backends.get(listener)
        if backend is None:
            continue
        matched_listener = True
        rule_conns.append(rule.limits.max_conns)
        listener_conns.append(backend.limits.max_conns)
        durations.extend((rule.limits.max_conn_duration, backend.limits.max_conn_duration))
        sizes.extend((rule.limits.max_bytes_per_conn, backend.limits.max_bytes_per_conn))
        if backend.pg is None:
            continue
        entry = backend.pg.databases.get(database)
        if entry is None:
            entry = backend.pg.databases.get(WILDCARD)
        if entry is None:
            continue
        pairs = _pairs(entry.permissions, entry.schemas)
        if entry.sql:
            custom.add(CustomGrant(privileges=pairs, sql=entry.sql))
        else:
            privileges |= pairs

    if not matched_listener:
        return errors.not_authorized_listener(
            listener, detail=f"none of {len(parsed.rules)} capability rule(s) has this listener"
        )
    refused = _database_refusal(parsed, listener, database, admin_database)
    if refused is not None:
        return refused
    if not privileges and not custom:
        return errors.not_authorized_database(
            database,
            listener,
            detail=f'no rule for listener "{listener}" has an entry for this database or "*"',
        )

    custom_grants: tuple[CustomGrant, ...]
    if preset_cap is not None:
        capped = _cap(privileges, preset_cap)
        for grant in custom:
            capped |= _cap(grant.privileges, preset_cap)
        if not capped:
            return errors.not_authorized_database(
                database,
                listener,
                detail=(
                    f"the preset cap {preset_cap.label} drops raw SQL, "
                    "and the grant holds nothing else"
                ),
            )
        final_privileges = capped
        custom_grants = ()
    else:
        final_privileges = frozenset(privileges)
        custom_grants = tuple(sorted(custom, key=_custom_sort_key))
        if not allow_raw_sql and any(c.sql for c in custom_grants):
            count = sum(len(c.sql) for c in custom_grants)
            return errors.raw_sql_not_allowed(
                listener,
                detail=f"{count} raw SQL statement(s) for database {database!r}; allow_raw_sql is off",
            )

    limits = Limits(
        max_conns_user=int(_strictest(rule_conns)),
        max_conns_listener=int(_strictest(listener_conns)),
        max_conn_duration=float(_strictest(durations)),
        max_bytes_per_conn=int(_strictest(sizes)),
    )
    return EffectiveGrant(
        listener=listener,
        database=database,
        privileges=final_privileges,
        custom=custom_grants,
        limits=limits,
        preset_cap=preset_cap,
    )


#: How many rule tuples keep their parse (:func:`_parse`).
PARSED_RULES: Final = 512
#: id(rules) -> (rules, their parse or why they do not parse).
_parsed: LRU[int, tuple[tuple[Any, ...], ParsedRules | RuleError]] = LRU(PARSED_RULES)


def _parse(rules: Sequence[Any]) -> ParsedRules | RuleError:
    """``parse_rules(rules)``, or the :class:`RuleError` it raises. A tuple (an identity's
    rules) keeps its result, by the tuple itself (held here, so its id names no other while
    kept): the identity provider hands out the same identity, rules and all, for the same
    answer from tailscaled, so each connection after the first skips the parse. The rule
    objects are JSON values nobody changes."""
    if isinstance(rules, tuple):
        entry = _parsed.get(id(rules))
        if entry is not None and entry[0] is rules:
            return entry[1]
    try:
        result: ParsedRules | RuleError = parse_rules(list(rules))
    except RuleError as exc:
        result = exc
    if isinstance(rules, tuple):
        _parsed.put(id(rules), (rules, result))
    return result


def evaluate_rules(
    rules: Sequence[Any],
    listener: str,
    database: str,
    *,
    admin_database: str,
    defaults: LimitsConfig,
    preset_cap: Preset | None = None,
    allow_raw_sql: bool,
) -> Evaluation:
    """Parse raw rule objects and evaluate them; keeps the parse warnings."""
    parsed = _parse(rules)
    if isinstance(parsed, RuleError):
        exc = parsed
        first = exc.problems[0]
        more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
        detail = "; ".join(exc.problems)
        if exc.warnings:
            detail += "; also: " + "; ".join(exc.warnings)
        return Evaluation(errors.bad_grant(first + more, detail=detail), exc.warnings)
    result = evaluate_parsed(
        parsed,
        listener,
        database,
        admin_database=admin_database,
        defaults=defaults,
        preset_cap=preset_cap,
        allow_raw_sql=allow_raw_sql,
    )
    return Evaluation(result, parsed.warnings)


def evaluate(
    identity: Identity,
    listener: str,
    database: str,
    *,
    admin_database: str,
    defaults: LimitsConfig,
    preset_cap: Preset | None = None,
    allow_raw_sql: bool,
) -> EffectiveGrant | Refusal:
    """What ``identity`` may do on ``listener`` / ``database``, or why not.

    Malformed rules refuse with ``28000`` (``bad_grant``) whose log-only
    detail names every bad field; use :func:`evaluate_rules` to also get the
    unknown-field warnings.
    """
    return evaluate_rules(
        identity.rules,
        listener,
        database,
        admin_database=admin_database,
        defaults=defaults,
        preset_cap=preset_cap,
        allow_raw_sql=allow_raw_sql,
    ).result


def console_access(identity: Identity, listener: str) -> str | Refusal:
    """The console access ``identity`` has on ``listener``: ``"admin"`` or ``"read"`` (the
    highest any applying rule gives), or the refusal (``28000``) when no rule gives any, or
    the rules are malformed."""
    try:
        parsed = parse_rules(list(identity.rules))
    except RuleError as exc:
        return errors.bad_grant(exc.problems[0], detail="; ".join(exc.problems))
    levels = {
        entry.console
        for rule in parsed.rules
        for name, entry in rule.backends.items()
        if name == listener and entry.console is not None
    }
    if "admin" in levels:
        return "admin"
    if "read" in levels:
        return "read"
    return errors.console_not_authorized(listener)
