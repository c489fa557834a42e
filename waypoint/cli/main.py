"""The ``waypoint`` command line.

Each subcommand lives in its own module ``waypoint.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported lazily. A module
with ``TAKES_CONFIG = True`` gets ``-c/--config`` from :func:`waypoint.cli.options.config_parent`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from waypoint import __version__
from waypoint.cli.options import config_parent

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("waypoint.cli.run_cmd", "run the daemon"),
    "reload": ("waypoint.cli.reload", "validate a config file and make the running daemon reload it"),
    "check": ("waypoint.cli.check", "validate a config file and print the effective configuration"),
    "explain": ("waypoint.cli.explain", "show how a grant evaluates for an identity"),
    "roles": ("waypoint.cli.roles", "list or reap the roles Waypoint created"),
    "sessions": ("waypoint.cli.sessions", "list or end live sessions through a listener's console"),
    "lock": ("waypoint.cli.lock", "lock a login out, unlock it, or list locks (console)"),
    "audit": ("waypoint.cli.audit", "verify or search statement audit files"),
    "demo": ("waypoint.cli.demo", "run everything locally: throwaway PostgreSQL, static identity, Waypoint"),
}


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="waypoint", description="PostgreSQL access proxy for Tailscale networks"
    )
    parser.add_argument("--version", action="version", version=f"waypoint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name and available_only:
                continue
            raise
        parents = [config_parent()] if getattr(module, "TAKES_CONFIG", False) else []
        sp = sub.add_parser(name, help=help_text, description=help_text, parents=parents)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result: int = args._module.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
