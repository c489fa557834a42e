r"""Structured event logging: one event name plus fields, rendered human-readable or as JSON lines.

Callers never pass secrets; values are rendered with ``repr``-free formatting and long values are
cut. ``configure(fmt)`` is called once by the CLI (or by tests).

Many values are chosen by clients (database and user names, application_name, TLS server
names, node names, refusal details that quote them). No character that is not printable
(``str.isprintable``: control characters such as CR and ESC, C1 controls, line and paragraph
separators, bidirectional overrides) ever reaches the log raw, in either format: the human
format writes it as ``\r``, ``\x1b``, ``\u2028``... inside a quoted value, JSON as ``\uXXXX``.
So a value can neither start a forged line nor send a terminal escape.

JSON lines always carry the keys of :data:`STABLE_KEYS` (``null`` when a line has no such
value), then the event's other fields. Waypoint's own code logs only through
:class:`EventLogger` (``tests/test_logs.py`` checks that no module under ``waypoint`` uses
``logging`` directly): every value is a named field. Records of the libraries underneath
(pg8000, redis, trio...) go through the same handler and formatters at warning and above, as the
event ``library_log`` with the fields ``logger`` (``redis.sentinel``) and ``message`` (their text).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, Literal, TextIO

LOGGER_NAME = "waypoint"
_MAX_VALUE = 2000

Format = Literal["human", "json"]


#: Keys every JSON line carries, in this order (``null`` when the line has no such value).
STABLE_KEYS: tuple[str, ...] = (
    "ts",
    "level",
    "event",
    "conn_id",
    "listener",
    "login",
    "node",
    "db",
    "role",
    "sqlstate",
    "duration_ms",
    "bytes_in",
    "bytes_out",
)


#: Characters a quoted value escapes, and those that make a value need quotes (set
#: lookups: the human format checks every field of every line).
_QUOTED_SPECIAL = frozenset('"\\')
_BARE_SPECIAL = frozenset(' "=\\')

_SHORT_ESCAPES: dict[str, str] = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def _escape_char(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_text(text: str, *, quoted: bool = True) -> str:
    """``text`` with every character that is not printable written as an escape (``\\r``,
    ``\\x1b``, ``\\u202e``); with ``quoted`` also ``"`` and ``\\``, so the result can stand
    between quotes."""
    special = '"\\' if quoted else ""
    if text.isprintable() and (not quoted or _QUOTED_SPECIAL.isdisjoint(text)):
        return text
    return "".join(
        ch if ch.isprintable() and ch not in special else _escape_char(ch) for ch in text
    )


def human_value(text: str) -> str:
    """A value as the human format writes it: bare when it is plain, else quoted and escaped."""
    if text and text.isprintable() and _BARE_SPECIAL.isdisjoint(text):
        return text
    return f'"{escape_text(text)}"'


def _json_safe(line: str) -> str:
    """A JSON text with every non-printable character still in it written as ``\\uXXXX``
    (``json.dumps`` with ``ensure_ascii=False`` escapes only U+0000..U+001F)."""
    if line.isprintable():
        return line
    out: list[str] = []
    for ch in line:
        if ch.isprintable():
            out.append(ch)
            continue
        code = ord(ch)
        if code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return "".join(out)


#: The event of a record that did not come through :class:`EventLogger` (a library's).
LIBRARY_EVENT = "library_log"


def _event_and_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The event name and fields of ``record``; a plain stdlib record (a library's) becomes
    :data:`LIBRARY_EVENT` with its logger's name and its text as fields."""
    event = getattr(record, "wp_event", None)
    if event is not None:
        fields: dict[str, Any] = getattr(record, "wp_fields", {})
        return str(event), fields
    return LIBRARY_EVENT, {"logger": record.name, "message": _message(record)}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event, fields = _event_and_fields(record)
        out: dict[str, Any] = dict.fromkeys(STABLE_KEYS)
        out["ts"] = _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
            timespec="milliseconds"
        )
        out["level"] = record.levelname.lower()
        out["event"] = event
        for key, value in fields.items():
            if key in ("ts", "level", "event"):
                key = f"field_{key}"
            out[key] = _clip(value)
        if record.exc_info and record.exc_info[1] is not None:
            out["exception"] = _clip(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
        return _json_safe(json.dumps(out, default=str, ensure_ascii=False))


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # a bad %-format in a caller: still one valid line
        return f"{record.msg} {record.args!r}"


class _HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event, fields = _event_and_fields(record)
        ts = _dt.datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        parts = [f"{ts} {record.levelname:<7} {escape_text(event, quoted=False)}"]
        for key, value in fields.items():
            if value is None:
                continue
            parts.append(f"{escape_text(str(key), quoted=False)}={human_value(str(_clip(value)))}")
        line = " ".join(parts)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += f" exception={human_value(str(_clip(f'{type(exc).__name__}: {exc}')))}"
        return line


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_VALUE:
        return value[:_MAX_VALUE] + "…"
    return value


class _Handler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure` installs (on Waypoint's logger and on the root logger
    for the libraries'), so that a second call replaces it rather than adding one."""


def _formatter(fmt: Format) -> logging.Formatter:
    return _JsonFormatter() if fmt == "json" else _HumanFormatter()


def configure(
    fmt: Format = "human", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Route Waypoint's events to ``stream`` (stderr by default) in the given format, and the
    libraries' records at warning and above to the same stream, as ``library_log`` events."""
    target = stream or sys.stderr
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _Handler(target)
    handler.setFormatter(_formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    libraries = _Handler(target)
    libraries.setFormatter(_formatter(fmt))
    libraries.setLevel(max(level, logging.WARNING))
    root.addHandler(libraries)


LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def current_format() -> Format:
    """The format Waypoint's handlers write now (human when none is configured)."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler.formatter, _JsonFormatter):
            return "json"
    return "human"


def switch(fmt: Format, level: int) -> None:
    """Change the format and level of Waypoint's configured handlers in place (a reload):
    the lines go on to the same stream."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        configure(fmt, level=level)
        return
    for handler in logger.handlers:
        handler.setFormatter(_formatter(fmt))
    logger.setLevel(level)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler):
            handler.setFormatter(_formatter(fmt))
            handler.setLevel(max(level, logging.WARNING))


class EventLogger:
    """``log.info("session_end", conn_id=..., bytes_in=...)``: an event name and fields."""

    def __init__(self, component: str, **context: Any) -> None:
        self._logger = logging.getLogger(f"{LOGGER_NAME}.{component}")
        self._context = context

    def bind(self, **context: Any) -> EventLogger:
        child = EventLogger.__new__(EventLogger)
        child._logger = self._logger
        child._context = {**self._context, **context}
        return child

    def _log(self, level: int, event: str, exc: bool, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        merged = {**self._context, **fields}
        self._logger.log(level, event, exc_info=exc, extra={"wp_event": event, "wp_fields": merged})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, *, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)


def get_logger(component: str, **context: Any) -> EventLogger:
    return EventLogger(component, **context)
