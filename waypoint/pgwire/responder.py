"""A sans-IO PostgreSQL server for a virtual database that Waypoint answers itself.

It speaks enough of protocol 3 for psql, psycopg and pgjdbc to log in and read result sets:
the session start (AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery), simple
Query, and the extended protocol (Parse / Bind / Describe / Execute / Sync / Close / Flush).
Every result column is text. The caller decides what a statement means:

    responder = Responder(describe, parameters, key)
    send(responder.start())
    responder.feed(received)
    while (event := responder.next_event()) is not None:
        if isinstance(event, Statement): responder.answer(run(event.sql))
        elif isinstance(event, Terminated): close
    send(responder.data_to_send())

``describe(sql)`` says, before anything runs, which columns a statement returns (a tuple of
names, ``()`` for none) or why it is wrong (:class:`StatementError`); Parse uses it, so a
syntax error is reported at Parse as PostgreSQL does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs

from .errors import ProtocolError
from .framing import Message, MessageReader, build_message
from .messages import AuthenticationOk, BackendKeyData, ErrorResponse, ParameterStatus

#: OID of ``text``: every column the responder describes.
TEXT_OID: Final = 25
#: Longest message a console client may send (a statement is short).
MAX_MESSAGE: Final = 1024 * 1024

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


@attrs.frozen
class StatementError:
    """Why a statement failed: SQLSTATE, message, and the 1-based character position."""

    sqlstate: str
    message: str
    position: int | None = None
    hint: str | None = None


@attrs.frozen
class Result:
    """A statement's answer: ``columns`` (may be empty), text ``rows`` and the command tag."""

    tag: str
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str | None, ...], ...] = ()


@attrs.frozen
class Statement:
    """Event: run ``sql`` and :meth:`Responder.answer` it."""

    sql: str
    extended: bool


@attrs.frozen
class Terminated:
    """Event: the client sent Terminate (or broke the protocol); close the connection."""

    error: str | None = None


Describe = Callable[[str], "tuple[str, ...] | StatementError"]


def error_response(err: StatementError, severity: str = "ERROR") -> bytes:
    fields = {"S": severity, "V": severity, "C": err.sqlstate, "M": err.message}
    if err.hint is not None:
        fields["H"] = err.hint
    if err.position is not None:
        fields["P"] = str(err.position)
    return ErrorResponse(fields).encode()


def _row_description(columns: Sequence[str], formats: Sequence[int] = ()) -> bytes:
    body = bytearray(_I16.pack(len(columns)))
    for i, name in enumerate(columns):
        fmt = formats[i] if i < len(formats) else (formats[0] if len(formats) == 1 else 0)
        body += name.encode() + b"\0"
        body += struct.pack("!ihihih", 0, 0, TEXT_OID, -1, -1, fmt)
    return build_message(b"T", bytes(body))


def _data_row(row: Sequence[str | None]) -> bytes:
    body = bytearray(_I16.pack(len(row)))
    for value in row:
        if value is None:
            body += _I32.pack(-1)
        else:
            raw = value.encode("utf-8", "surrogateescape")
            body += _I32.pack(len(raw)) + raw
    return build_message(b"D", bytes(body))


class _Body:
    """Reads one frontend message body; a short or malformed body is a ProtocolError."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = body
        self.pos = 0
        self.what = what

    def cstring(self) -> str:
        end = self.body.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError(f"malformed {self.what}: unterminated string")
        text = self.body[self.pos : end].decode("utf-8", "surrogateescape")
        self.pos = end + 1
        return text

    def int16(self) -> int:
        if self.pos + 2 > len(self.body):
            raise ProtocolError(f"malformed {self.what}: too short")
        (value,) = _I16.unpack_from(self.body, self.pos)
        self.pos += 2
        return int(value)

    def int32(self) -> int:
        if self.pos + 4 > len(self.body):
            raise ProtocolError(f"malformed {self.what}: too short")
        (value,) = _I32.unpack_from(self.body, self.pos)
        self.pos += 4
        return int(value)

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.body):
            raise ProtocolError(f"malformed {self.what}: too short")
        self.pos += n


@attrs.define
class _Prepared:
    sql: str
    columns: tuple[str, ...]
    param_types: tuple[int, ...]


@attrs.define
class _Portal:
    sql: str
    columns: tuple[str, ...]
    formats: tuple[int, ...]


class Responder:
    """The server side of one virtual-database session. No I/O; see the module docstring."""

    def __init__(
        self,
        describe: Describe,
        parameters: Mapping[str, str],
        key: BackendKeyData,
    ) -> None:
        self._describe = describe
        self._parameters = dict(parameters)
        self._key = key
        self._reader = MessageReader(MAX_MESSAGE)
        self._out = bytearray()
        self._statements: dict[str, _Prepared] = {}
        self._portals: dict[str, _Portal] = {}
        self._pending: Statement | None = None
        self._pending_portal: _Portal | None = None
        self._skipping = False  # extended protocol: an error, so discard until Sync
        self._status = b"I"
        self._closed = False

    # -- output ------------------------------------------------------------------------------

    def start(self) -> bytes:
        """The session start: AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery."""
        out = bytearray(AuthenticationOk().encode())
        for name, value in self._parameters.items():
            out += ParameterStatus(name, value).encode()
        out += self._key.encode()
        out += build_message(b"Z", self._status)
        return bytes(out)

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def transaction_status(self) -> bytes:
        return self._status

    # -- input -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_event(self) -> Statement | Terminated | None:
        """The next thing the caller must act on; None when more bytes are needed (or an
        answer is awaited)."""
        if self._closed:
            return None
        while self._pending is None:
            try:
                msg = self._reader.next_message()
            except ProtocolError as exc:
                return self._fail(str(exc))
            if msg is None:
                return None
            try:
                event = self._handle(msg)
            except ProtocolError as exc:
                return self._fail(str(exc))
            if event is not None:
                return event
        return None

    def _fail(self, why: str) -> Terminated:
        self._closed = True
        self._out += error_response(StatementError("08P01", why), "FATAL")
        return Terminated(why)

    def answer(self, result: Result | StatementError) -> None:
        """The answer to the pending :class:`Statement`."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("no statement is waiting for an answer")
        self._pending = None
        portal = self._pending_portal
        self._pending_portal = None
        if isinstance(result, StatementError):
            self._error(result, extended=pending.extended)
            if not pending.extended:
                self._ready()
            return
        if not pending.extended and result.columns:
            self._out += _row_description(result.columns)
        formats = portal.formats if portal is not None else ()
        del formats  # checked at Bind
        for row in result.rows:
            # Binary ``text`` is its UTF-8 bytes: the same DataRow either way.
            self._out += _data_row(row)
        self._out += build_message(b"C", result.tag.encode() + b"\0")
        self._track_transaction(result.tag)
        if not pending.extended:
            self._ready()

    def _track_transaction(self, tag: str) -> None:
        if tag == "BEGIN":
            self._status = b"T"
        elif tag in ("COMMIT", "ROLLBACK"):
            self._status = b"I"

    def _error(self, err: StatementError, *, extended: bool) -> None:
        self._out += error_response(err)
        if self._status == b"T":
            self._status = b"E"
        if extended:
            self._skipping = True

    def _ready(self) -> None:
        self._out += build_message(b"Z", self._status)

    def _handle(self, msg: Message) -> Statement | Terminated | None:
        kind = msg.type
        if kind == b"X":
            self._closed = True
            return Terminated()
        if kind == b"S":
            self._skipping = False
            self._portals.pop("", None)
            self._ready()
            return None
        if kind == b"H":
            return None
        if self._skipping and kind in b"PBDEC":
            return None
        if kind == b"Q":
            sql = _Body(msg.body, "Query").cstring()
            if not sql.strip().strip(";").strip():
                self._out += build_message(b"I")
                self._ready()
                return None
            described = self._describe(sql)
            if isinstance(described, StatementError):
                self._error(described, extended=False)
                self._ready()
                return None
            self._pending = Statement(sql, extended=False)
            return self._pending
        if kind == b"P":
            self._parse(msg.body)
            return None
        if kind == b"B":
            self._bind(msg.body)
            return None
        if kind == b"D":
            self._describe_message(msg.body)
            return None
        if kind == b"E":
            return self._execute(msg.body)
        if kind == b"C":
            body = _Body(msg.body, "Close")
            what = body.body[:1]
            body.skip(1)
            name = body.cstring()
            (self._statements if what == b"S" else self._portals).pop(name, None)
            self._out += build_message(b"3")
            return None
        if kind in (b"d", b"c", b"f"):
            return None  # COPY data outside COPY: ignored, as PostgreSQL does
        self._error(
            StatementError("0A000", f"message type {kind!r} is not supported by this database"),
            extended=True,
        )
        if kind == b"F":
            self._skipping = False
            self._ready()
        return None

    def _parse(self, raw: bytes) -> None:
        body = _Body(raw, "Parse")
        name = body.cstring()
        sql = body.cstring()
        count = body.int16()
        types = tuple(body.int32() for _ in range(max(count, 0)))
        described = self._describe(sql) if sql.strip() else ()
        if isinstance(described, StatementError):
            self._error(described, extended=True)
            return None
        self._statements[name] = _Prepared(sql, described, types)
        self._out += build_message(b"1")
        return None

    def _bind(self, raw: bytes) -> None:
        body = _Body(raw, "Bind")
        portal = body.cstring()
        statement = body.cstring()
        nformats = body.int16()
        for _ in range(max(nformats, 0)):
            body.int16()
        nparams = body.int16()
        for _ in range(max(nparams, 0)):
            size = body.int32()
            if size > 0:
                body.skip(size)
        nresult = body.int16()
        formats = tuple(body.int16() for _ in range(max(nresult, 0)))
        prepared = self._statements.get(statement)
        if prepared is None:
            self._error(
                StatementError("26000", f'prepared statement "{statement}" does not exist'),
                extended=True,
            )
            return None
        if any(f not in (0, 1) for f in formats):
            self._error(StatementError("08P01", "unknown result format code"), extended=True)
            return None
        self._portals[portal] = _Portal(prepared.sql, prepared.columns, formats)
        self._out += build_message(b"2")
        return None

    def _describe_message(self, raw: bytes) -> None:
        body = _Body(raw, "Describe")
        what = body.body[:1]
        body.skip(1)
        name = body.cstring()
        if what == b"S":
            prepared = self._statements.get(name)
            if prepared is None:
                self._error(
                    StatementError("26000", f'prepared statement "{name}" does not exist'),
                    extended=True,
                )
                return None
            params = bytearray(_I16.pack(len(prepared.param_types)))
            for oid in prepared.param_types:
                params += _I32.pack(oid if oid else TEXT_OID)
            self._out += build_message(b"t", bytes(params))
            self._out += (
                _row_description(prepared.columns) if prepared.columns else build_message(b"n")
            )
            return None
        portal = self._portals.get(name)
        if portal is None:
            self._error(StatementError("34000", f'portal "{name}" does not exist'), extended=True)
            return None
        self._out += (
            _row_description(portal.columns, portal.formats)
            if portal.columns
            else build_message(b"n")
        )
        return None

    def _execute(self, raw: bytes) -> Statement | None:
        body = _Body(raw, "Execute")
        name = body.cstring()
        body.int32()  # row limit: every result is small, so it is sent whole
        portal = self._portals.get(name)
        if portal is None:
            self._error(StatementError("34000", f'portal "{name}" does not exist'), extended=True)
            return None
        if not portal.sql.strip():
            self._out += build_message(b"I")
            return None
        self._pending = Statement(portal.sql, extended=True)
        self._pending_portal = portal
        return self._pending
