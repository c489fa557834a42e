"""``waypoint lock``: lock a login out (``LOCK LOGIN``), ``--unlock`` it, or ``--list`` the locks,
through a listener's console (``console: admin`` to change, ``read`` to list)."""

from __future__ import annotations

import argparse

from waypoint.cli.console_client import (
    add_connection_arguments,
    add_node_arguments,
    execute,
    node_clause,
    quote,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("login", nargs="?", help="the login to lock or unlock")
    add_node_arguments(parser, "lock or unlock")
    parser.add_argument("--reason", help="why (required to lock; the refused caller reads it)")
    parser.add_argument(
        "--for", dest="duration", metavar="DURATION", help="e.g. 30m, 2h (default: until unlocked)"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--unlock", action="store_true", help="remove the lock")
    action.add_argument("--list", action="store_true", help="list the locks in force")


def statement(args: argparse.Namespace) -> str:
    if args.list:
        return "SHOW LOCKS"
    if not args.login:
        raise SystemExit("waypoint lock: give a LOGIN (or --list)")
    node = node_clause(args)
    if args.unlock:
        return f"UNLOCK LOGIN {quote(args.login)}{node}"
    if not args.reason:
        raise SystemExit("waypoint lock: --reason is required to lock")
    duration = f" FOR {quote(args.duration)}" if args.duration else ""
    return f"LOCK LOGIN {quote(args.login)}{node}{duration} REASON {quote(args.reason)}"


def run(args: argparse.Namespace) -> int:
    return execute(args, statement(args))
