"""``waypoint roles list|reap -c FILE``: the roles Waypoint created, and one reaper pass
(docs/operations.md).

``list`` prints, per listener, each Waypoint role (name, the identity recorded in its
marker, listener, database, ``VALID UNTIL`` or ``retired``, live sessions, backends waiting in
a Waypoint pool, groups, and what it owns: counts per kind per database) and each Waypoint group with its members. ``reap``
runs one pass and prints what it dropped, retired, skipped and could not drop (and the
prepared transactions of those roles it rolled back first); with
``--dry-run`` it prints what a pass would do and changes nothing.

Exit status: 0 done; 1 the server could not be reached or some role could not be
dropped; 2 configuration or usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TextIO

import trio

from waypoint.cli.options import config_parent
from waypoint.config.load import ConfigError, load_config
from waypoint.config.model import Config, ListenerConfig
from waypoint.provision.admin import AdminError
from waypoint.provision.engine import Provisioner
from waypoint.reaper import catalog
from waypoint.reaper.engine import Reaper, ReapError, ReapReport, RoleListing
from waypoint.reaper.transactions import Owned, RoleInfo

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="roles_command", metavar="ACTION", required=True)
    config = config_parent()
    for name, help_text in (
        ("list", "list the roles and groups Waypoint created"),
        (
            "reap",
            "run one reaper pass: drop (or, owning objects, retire) expired roles; drop "
            "unused groups",
        ),
    ):
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=[config])
        sp.add_argument(
            "--listener", metavar="NAME", help="only this listener (default: every listener)"
        )
        if name == "reap":
            sp.add_argument(
                "--dry-run",
                action="store_true",
                help="print what the pass would drop; change nothing",
            )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    listeners = list(config.listeners)
    if args.listener is not None:
        listeners = [lst for lst in listeners if lst.name == args.listener]
        if not listeners:
            names = ", ".join(lst.name for lst in config.listeners) or "none"
            print(
                f"{args.config}: no listener named {args.listener!r} (listeners: {names})",
                file=sys.stderr,
            )
            return EXIT_USAGE
    if not listeners:
        print(f"{args.config}: no listeners configured", file=sys.stderr)
        return EXIT_USAGE
    if args.roles_command == "list":
        return trio.run(_list, config, listeners, sys.stdout)
    return trio.run(_reap, config, listeners, bool(args.dry_run), sys.stdout)


def _reaper(config: Config, lst: ListenerConfig) -> tuple[Reaper, Provisioner]:
    prov = Provisioner(lst, handshake_timeout=config.handshake_timeout)
    known = [x.name for x in config.listeners]
    return Reaper(lst, prov, known_listeners=known), prov


async def _list(config: Config, listeners: Sequence[ListenerConfig], out: TextIO) -> int:
    status = EXIT_OK
    for lst in listeners:
        reaper, prov = _reaper(config, lst)
        try:
            listing = await reaper.list_roles()
            owned = await reaper.owned_summary()
            pooled = await _pooled_counts(prov, lst)
        except ReapError as exc:
            print(f"{lst.name}: {exc}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        finally:
            await prov.aclose()
        _print_listing(lst, listing, out, owned, pooled)
    return status


# Backends of the listener's roles waiting in a Waypoint instance's pool: idle, their last
# statement the listener's reset (a pooled backend is reset before it waits, and checked
# only when it is handed out again).
_POOLED_QUERY = (
    "SELECT usename::pg_catalog.text, pg_catalog.count(*) FROM pg_catalog.pg_stat_activity "
    f"WHERE usename LIKE :pattern ESCAPE '{catalog.LIKE_ESCAPE}' AND state = 'idle' "
    "AND query = :reset GROUP BY 1"
)


async def _pooled_counts(prov: Provisioner, lst: ListenerConfig) -> dict[str, int]:
    """Pooled backends per role of ``lst`` (none when its pool is off)."""
    if not lst.pool:
        return {}
    pattern = catalog.like_prefix(lst.postgres.user_prefix)
    try:
        rows = await prov.pools.run(
            prov.pools.admin_database,
            lambda s: s.run(_POOLED_QUERY, pattern=pattern, reset=lst.pool_reset_query),
        )
    except AdminError as exc:
        raise ReapError(f"listing pooled backends failed: {exc}") from None
    return {str(role): int(str(count)) for role, count in rows}


def _format_until(info: RoleInfo) -> str:
    if info.retired:
        return "retired"
    if info.valid_until is None:
        return "expired" if info.expired else "never"
    text = info.valid_until.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{text} (expired)" if info.expired else text


def _table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def format_owned(role: str, owned: Sequence[Owned]) -> str:
    """``appdb: 1 functions, 2 relations; cluster: 1 databases`` (``-`` when nothing)."""
    per_db: dict[str, list[str]] = {}
    for o in owned:
        if o.role == role:
            per_db.setdefault(o.database or "cluster", []).append(f"{o.count} {o.kind}")
    return "; ".join(f"{db}: {', '.join(sorted(kinds))}" for db, kinds in per_db.items()) or "-"


def _print_listing(
    lst: ListenerConfig,
    listing: RoleListing,
    out: TextIO,
    owned: Sequence[Owned] = (),
    pooled: Mapping[str, int] | None = None,
) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    retired = sum(1 for r in listing.roles if r.retired)
    print(
        f"listener {lst.name} (prefix {lst.postgres.user_prefix}, {len(listing.roles)} roles "
        f"({retired} retired), {len(listing.groups)} groups, as of {now}):",
        file=out,
    )
    if listing.roles:
        rows: list[tuple[str, ...]] = [
            (
                "ROLE",
                "IDENTITY",
                "LISTENER",
                "DATABASE",
                "VALID UNTIL",
                "LIVE",
                "POOLED",
                "GROUPS",
                "OWNS",
            )
        ]
        for info in listing.roles:
            owner = info.owner
            assert owner is not None  # listed roles carry the marker
            who = f"{owner.login} on {owner.node}"
            if owner.preset is not None:
                who += f" (preset {owner.preset})"
            rows.append(
                (
                    info.name,
                    who,
                    owner.listener,
                    owner.database,
                    _format_until(info),
                    str(info.live_sessions - (pooled or {}).get(info.name, 0)),
                    str((pooled or {}).get(info.name, 0)),
                    ",".join(info.groups) or "-",
                    format_owned(info.name, owned),
                )
            )
        _table(rows, out)
    if listing.groups:
        grows: list[tuple[str, ...]] = [("GROUP", "DATABASE", "GRANTS", "MEMBERS", "OWNS")]
        for info in listing.groups:
            g = info.group_owner
            assert g is not None
            what = f"{g.preset} on {g.schema}" if g.kind == "preset" else f"raw SQL {g.digest}"
            grows.append(
                (
                    info.name,
                    g.database,
                    what,
                    str(len(info.members)),
                    format_owned(info.name, owned),
                )
            )
        print(file=out)
        _table(grows, out)


async def _reap(
    config: Config, listeners: Sequence[ListenerConfig], dry_run: bool, out: TextIO
) -> int:
    status = EXIT_OK
    for lst in listeners:
        reaper, prov = _reaper(config, lst)
        try:
            report = await reaper.run_pass(dry_run=dry_run)
        except ReapError as exc:
            print(f"{lst.name}: {exc}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        finally:
            await prov.aclose()
        _print_report(report, out)
        if report.failed:
            status = EXIT_FAILED
    return status


def _print_report(report: ReapReport, out: TextIO) -> None:
    name = report.listener
    if report.disabled is not None:
        print(f"{name}: nothing done: {report.disabled}", file=out)
        return
    verb = "would drop" if report.dry_run else "dropped"
    retire = "would retire" if report.dry_run else "retired"
    undo = "would roll back" if report.dry_run else "rolled back"
    for role, count in report.rolled_back:
        # Before the drop or retirement: DROP ROLE would leave them with no owner.
        print(f"{name}: {undo} {count} prepared transaction(s) of {role}", file=out)
    for role in report.dropped_roles:
        print(f"{name}: {verb} role {role}", file=out)
    for role in report.retired_roles:
        print(f"{name}: {retire} role {role} (it owns objects; they stay its own)", file=out)
    for group in report.dropped_groups:
        print(f"{name}: {verb} group {group}", file=out)
    for s in report.skipped:
        print(f"{name}: skipped {s.role}: {s.reason}", file=out)
    for f in report.failed:
        print(f"{name}: could not drop {f.role}: {f.reason}", file=out)
    summary = (
        f"{name}: {len(report.dropped_roles)} role(s) and {len(report.dropped_groups)} "
        f"group(s) {verb}, {len(report.retired_roles)} role(s) {retire}, "
        f"{len(report.skipped)} skipped, {len(report.failed)} failed"
    )
    if report.deferred:
        summary += f", {report.deferred} left for the next pass"
    if report.dry_run:
        summary += " (dry run: nothing changed)"
    print(summary, file=out)
