"""``waypoint audit verify FILE...`` and ``waypoint audit search [filters] FILE...``."""

from __future__ import annotations

import argparse
import json
import sys

from waypoint.audit.chain import parse_time, search, verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = sub.add_parser(
        "verify",
        help="check the hash chain of audit files (oldest first)",
        description="Check the hash chain over the files in order (oldest first, e.g. "
        "audit.jsonl.2 audit.jsonl.1 audit.jsonl); report the first broken or missing link.",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    s = sub.add_parser("search", help="print the audit records matching filters")
    s.add_argument("--login")
    s.add_argument("--node")
    s.add_argument("--database")
    s.add_argument("--since", help="ISO 8601 time (UTC when no offset)")
    s.add_argument("--until", help="ISO 8601 time (UTC when no offset)")
    s.add_argument("--text", help="case-insensitive substring of the statement text")
    s.add_argument("files", nargs="+", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    try:
        if args.audit_command == "verify":
            report = verify(args.files)
            if report.problem is not None:
                print(
                    f"BROKEN after {report.records} good records: {report.problem}", file=sys.stderr
                )
                return 1
            print(f"OK: {report.records} records, chain intact")
            return 0
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        for record in search(
            args.files,
            login=args.login,
            node=args.node,
            database=args.database,
            since=since,
            until=until,
            text=args.text,
        ):
            print(json.dumps(record, ensure_ascii=False))
        return 0
    except (OSError, ValueError) as exc:
        print(f"waypoint audit: {exc}", file=sys.stderr)
        return 2
