"""What ``waypoint sessions`` and ``waypoint lock`` share: a pg8000 connection to a listener's
console database (docs/operations.md), one statement, a table or JSON on standard output.

The commands are thin clients: the console decides everything (who may, what happens); the CLI
only quotes values and prints answers. The caller is who tailscaled says the machine running
it is, as for any other client."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Sequence
from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILED = 1


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="Waypoint listener host")
    parser.add_argument("--port", type=int, default=5432, help="Waypoint listener port")
    parser.add_argument(
        "--dbname", default="waypoint", help="the listener's console_database (default: waypoint)"
    )
    parser.add_argument("--user", default="console", help="user name sent (Waypoint ignores it)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")
    parser.add_argument("--json", action="store_true", help="print JSON lines, not a table")


def quote(value: str) -> str:
    """A console string literal."""
    return "'" + value.replace("'", "''") + "'"


def add_node_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    """``--node NAME`` or ``--node-id STABLE_ID`` (one of them): narrow ``scope`` to one node."""
    node = parser.add_mutually_exclusive_group()
    node.add_argument("--node", help=f"{scope}: only this node (by its name)")
    node.add_argument(
        "--node-id", help=f"{scope}: only this node, by its stable id (survives a rename)"
    )


def node_clause(args: argparse.Namespace) -> str:
    """The console's `` NODE '<name>'`` / `` NODE ID '<stable id>'`` clause, or nothing."""
    if args.node_id:
        return f" NODE ID {quote(args.node_id)}"
    return f" NODE {quote(args.node)}" if args.node else ""


def run_statement(args: argparse.Namespace, sql: str) -> tuple[list[str], list[list[Any]]]:
    """Column names and rows of ``sql`` on the console. Raises pg8000's errors."""
    import pg8000.native

    context = ssl.create_default_context() if args.tls else None
    conn = pg8000.native.Connection(
        user=args.user,
        host=args.host,
        port=args.port,
        database=args.dbname,
        ssl_context=context,
        timeout=args.timeout,
        application_name="waypoint-cli",
    )
    try:
        rows: list[list[Any]] = conn.run(sql) or []
        columns = [str(c["name"]) for c in conn.columns or []]
        return columns, rows
    finally:
        conn.close()


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def execute(
    args: argparse.Namespace, sql: str, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run ``sql`` and print its answer (standard output by default); errors go to ``err``
    (standard error) with their SQLSTATE."""
    out = out or sys.stdout
    err = err or sys.stderr
    import pg8000.exceptions

    try:
        columns, rows = run_statement(args, sql)
    except pg8000.exceptions.DatabaseError as exc:
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        err.write(f"waypoint: {fields.get('C', '?')}: {fields.get('M', exc)}\n")
        return EXIT_FAILED
    except (pg8000.exceptions.InterfaceError, OSError) as exc:
        err.write(f"waypoint: cannot reach the console at {args.host}:{args.port}: {exc}\n")
        return EXIT_FAILED
    if not columns:
        out.write("done\n")
    elif args.json:
        for row in rows:
            out.write(json.dumps(dict(zip(columns, row, strict=True))) + "\n")
    else:
        print_table(columns, rows, out)
    return EXIT_OK
