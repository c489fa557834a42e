"""Reading audit files back: verify the hash chain, search records."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from .sink import GENESIS


@attrs.frozen
class ChainProblem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@attrs.frozen
class ChainReport:
    records: int
    problem: ChainProblem | None


def _lines(files: Sequence[str]) -> Iterator[tuple[str, int, bytes]]:
    for name in files:
        with open(name, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield name, number, raw.rstrip(b"\n")


def verify(files: Sequence[str]) -> ChainReport:
    """Check the chain over ``files`` in order (oldest first, e.g. ``audit.jsonl.2
    audit.jsonl.1 audit.jsonl``): each record's ``prev`` must be the SHA-256 of the line
    before it and ``seq`` must follow on. Reports the first broken or missing link: a
    deleted, reordered or edited line breaks the link after it."""
    prev_hash: str | None = None
    prev_seq: int | None = None
    count = 0
    for name, number, line in _lines(files):
        link = _link(line)
        if link is None:
            return ChainReport(
                count, ChainProblem(name, number, "not an audit record (no seq/prev)")
            )
        seq, prev = link
        if prev_hash is None:
            if seq == 1 and prev != GENESIS:
                return _problem(count, name, number, "the first record does not start the chain")
        else:
            if prev_seq is not None and seq != prev_seq + 1:
                return _problem(
                    count,
                    name,
                    number,
                    f"missing or reordered link: seq {seq} follows seq {prev_seq}",
                )
            if prev != prev_hash:
                return _problem(
                    count,
                    name,
                    number,
                    f"broken link: prev does not match the line before (seq {prev_seq}); "
                    "that line was edited or a line is missing",
                )
        prev_hash = hashlib.sha256(line).hexdigest()
        prev_seq = seq
        count += 1
    return ChainReport(count, None)


def _record(line: bytes) -> Any:
    """The JSON value of one line, or None when it is not JSON. Any bytes are answered: a
    file being checked may have been written by an attacker (a line nested deeper than the
    parser's recursion, invalid UTF-8, numbers out of range)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _link(line: bytes) -> tuple[int, str] | None:
    """A record's ``seq`` (an integer, as Waypoint writes it) and ``prev`` (a string), or
    None when the line is not an audit record."""
    record = _record(line)
    if not isinstance(record, dict):
        return None
    seq, prev = record.get("seq"), record.get("prev")
    if type(seq) is not int or not isinstance(prev, str):
        return None
    return seq, prev


def _problem(count: int, name: str, number: int, message: str) -> ChainReport:
    return ChainReport(count, ChainProblem(name, number, message))


def parse_time(value: str) -> datetime.datetime:
    """An ISO 8601 time; naive times are UTC."""
    ts = datetime.datetime.fromisoformat(value)
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=datetime.UTC)


def search(
    files: Sequence[str],
    *,
    login: str | None = None,
    node: str | None = None,
    database: str | None = None,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    text: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The records matching every filter given (``text``: a case-insensitive substring of
    the statement text). Lines that are not JSON are skipped."""
    needle = text.lower() if text is not None else None
    for _, _, line in _lines(files):
        record = _record(line)
        if not isinstance(record, dict):
            continue
        if login is not None and record.get("login") != login:
            continue
        if node is not None and record.get("node") != node:
            continue
        if database is not None and record.get("database") != database:
            continue
        if since is not None or until is not None:
            try:
                ts = parse_time(str(record.get("time")))
            except ValueError:
                continue
            if since is not None and ts < since:
                continue
            if until is not None and ts > until:
                continue
        if needle is not None and needle not in str(record.get("text") or "").lower():
            continue
        yield record
