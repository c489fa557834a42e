"""Key paths in the configuration and where they stand in the TOML text.

Neither tomlkit items nor cattrs carry line numbers, so a problem's line is found by locating
its key path in the source text (:class:`KeyLocator`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

KeyPath = tuple[str | int, ...]

__all__ = ["KeyLocator", "KeyPath", "format_key_path"]


def format_key_path(path: KeyPath) -> str:
    """``("listeners", 1, "postgres", "admin_password")`` → ``listeners[1].postgres.admin_password``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _BARE_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            quoted = json.dumps(part)
            out += f".{quoted}" if out else quoted
    return out


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class KeyLocator:
    """Maps key paths to the line (1-based) where they appear in TOML source text.

    Walks the text line by line, tracking the current table header and the
    index of each array of tables (``[[listeners]]``), so that
    ``("listeners", 1, "postgres", "admin_password")`` finds the
    ``admin_password`` line under the second ``[[listeners]]``'s
    ``[listeners.postgres]``. Keys inside inline tables and multi-line arrays
    are not indexed: :meth:`line_of` then answers with the line of the
    longest indexed prefix of the path (the key holding the inline value).
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        self._scan(text)

    def line_of(self, path: KeyPath) -> int | None:
        for n in range(len(path), 0, -1):
            line = self._lines.get(path[:n])
            if line is not None:
                return line
        return None

    def _record(self, path: KeyPath, lineno: int) -> None:
        self._lines.setdefault(path, lineno)

    def _scan(self, text: str) -> None:
        aot_index: dict[KeyPath, int] = {}
        current: KeyPath = ()
        depth = 0  # open [ and { of a value that spans lines
        open_string: str | None = None  # delimiter of a multi-line string

        def resolve(parts: Sequence[str]) -> KeyPath:
            path: KeyPath = ()
            for part in parts:
                path = (*path, part)
                if path in aot_index:
                    path = (*path, aot_index[path])
            return path

        for lineno, line in enumerate(text.splitlines(), start=1):
            pos = 0
            if open_string is not None:
                end = line.find(open_string)
                if end < 0:
                    continue
                open_string = None
                pos = end + 3
            elif depth == 0:
                stripped = line.lstrip()
                indent = len(line) - len(stripped)
                if stripped.startswith("[["):
                    parsed = _parse_dotted_key(line, indent + 2)
                    if parsed is not None and parsed[0]:
                        parts = parsed[0]
                        array = (*resolve(parts[:-1]), parts[-1])
                        index = aot_index.get(array, -1) + 1
                        aot_index[array] = index
                        self._record(array, lineno)
                        current = (*array, index)
                        self._record(current, lineno)
                    continue
                if stripped.startswith("["):
                    parsed = _parse_dotted_key(line, indent + 1)
                    if parsed is not None and parsed[0]:
                        current = resolve(parsed[0])
                        for n in range(1, len(current) + 1):
                            self._record(current[:n], lineno)
                    continue
                parsed = _parse_dotted_key(line, indent)
                if parsed is not None:
                    parts, after = parsed
                    rest = line[after:].lstrip()
                    if parts and rest.startswith("="):
                        for n in range(1, len(parts) + 1):
                            self._record((*current, *parts[:n]), lineno)
                        pos = line.index("=", after) + 1
                    else:
                        continue
                else:
                    continue
            depth, open_string = _scan_value(line, pos, depth)


def _parse_dotted_key(line: str, pos: int) -> tuple[list[str], int] | None:
    """Parse ``a.b."c d"`` starting at ``pos``; return the parts and the end position."""
    parts: list[str] = []
    n = len(line)
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n:
            return None
        ch = line[pos]
        if ch == '"':
            end = pos + 1
            buf = []
            while end < n and line[end] != '"':
                if line[end] == "\\" and end + 1 < n:
                    buf.append(line[end : end + 2])
                    end += 2
                    continue
                buf.append(line[end])
                end += 1
            if end >= n:
                return None
            try:
                parts.append(json.loads('"' + "".join(buf) + '"'))
            except ValueError:
                parts.append("".join(buf))
            pos = end + 1
        elif ch == "'":
            end = line.find("'", pos + 1)
            if end < 0:
                return None
            parts.append(line[pos + 1 : end])
            pos = end + 1
        else:
            m = _BARE_KEY.match(line, pos)
            if m is None:
                return None
            parts.append(m.group(0))
            pos = m.end()
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ".":
            pos += 1
            continue
        return parts, pos


def _scan_value(line: str, pos: int, depth: int) -> tuple[int, str | None]:
    """Track bracket depth and multi-line strings through the rest of a line."""
    n = len(line)
    while pos < n:
        ch = line[pos]
        if ch == "#":
            break
        if ch in "\"'":
            triple = ch * 3
            if line.startswith(triple, pos):
                end = line.find(triple, pos + 3)
                if end < 0:
                    return depth, triple
                pos = end + 3
                continue
            end = pos + 1
            while end < n and line[end] != ch:
                end += 2 if (ch == '"' and line[end] == "\\") else 1
            pos = end + 1
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        pos += 1
    return depth, None
