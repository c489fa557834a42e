"""``waypoint sessions``: the live sessions of every instance, through a listener's console
(``SHOW SESSIONS``); ``--kill CONN_ID`` or ``--kill-login LOGIN [--node NODE | --node-id STABLE_ID]`` ends them
(``console: admin``); ``--instances`` lists the instances."""

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
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--kill", metavar="CONN_ID", help="end this session")
    what.add_argument("--kill-login", metavar="LOGIN", help="end every session of this login")
    what.add_argument("--instances", action="store_true", help="list the instances instead")
    add_node_arguments(parser, "with --kill-login")


def statement(args: argparse.Namespace) -> str:
    if args.kill:
        return f"KILL {quote(args.kill)}"
    if args.kill_login:
        return f"KILL LOGIN {quote(args.kill_login)}{node_clause(args)}"
    if args.instances:
        return "SHOW INSTANCES"
    return "SHOW SESSIONS"


def run(args: argparse.Namespace) -> int:
    if (args.node or args.node_id) and not args.kill_login:
        raise SystemExit("waypoint sessions: --node and --node-id go with --kill-login")
    return execute(args, statement(args))
