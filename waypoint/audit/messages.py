"""How the audit tracker reads the wire, sans I/O: one direction of a session split into
messages (:class:`Framer`), and the bodies it records read incrementally by parsers that keep
at most a bound of each field and hash the rest as it passes (:class:`Text`), however large
the message and however its bytes are split."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Callable, Generator
from typing import Any, Final, Literal

ParameterMode = Literal["none", "hash", "full"]

# Frontend message types, by their type bytes.
QUERY, PARSE, BIND, EXECUTE, CLOSE, DESCRIBE, FUNCTION_CALL, SYNC, COPY_DATA = b"QPBECDFSd"
#: The frontend messages whose bodies go through a parser (the others' are skipped).
FRONT_PARSED: Final = frozenset({QUERY, PARSE, BIND, EXECUTE, CLOSE, FUNCTION_CALL})
# Backend message types.
COMMAND_COMPLETE, ERROR_RESPONSE, READY_FOR_QUERY, EMPTY_QUERY_RESPONSE = b"CEZI"
PORTAL_SUSPENDED, COPY_IN_RESPONSE, COPY_OUT_RESPONSE, COPY_BOTH_RESPONSE = b"sGHW"
#: The backend messages whose bodies go through a parser.
BACK_PARSED: Final = frozenset(
    {COMMAND_COMPLETE, ERROR_RESPONSE, COPY_IN_RESPONSE, COPY_OUT_RESPONSE, COPY_BOTH_RESPONSE}
)

#: Cap on names (statement, portal) kept from the wire.
_NAME_CAP: Final = 256
#: Cap on a backend message body kept (CommandComplete, ErrorResponse); the rest is skipped.
_BACKEND_CAP: Final = 4096
_HEADER: Final = struct.Struct("!Bi")
_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")


class Text:
    """A field read incrementally: at most ``cap`` bytes kept, the whole hashed when cut
    (or always, with ``always_hash``)."""

    __slots__ = ("cap", "hasher", "kept", "size")

    def __init__(self, cap: int, always_hash: bool = False) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.size = 0
        self.hasher: Any = hashlib.sha256() if always_hash else None

    def add(self, data: bytes | memoryview) -> None:
        n = len(data)
        room = self.cap - len(self.kept)
        if n <= room and self.hasher is None:
            self.kept += data
        else:
            if self.hasher is None:
                self.hasher = hashlib.sha256(self.kept)
            if room > 0:
                self.kept += data[:room]
            self.hasher.update(data)
        self.size += n

    @classmethod
    def whole(cls, data: bytes, cap: int) -> Text:
        """A field already complete in memory (the common case of a small message)."""
        text = cls(cap)
        text.size = len(data)
        if len(data) <= cap:
            text.kept = bytearray(data)
        else:
            text.kept = bytearray(data[:cap])
            text.hasher = hashlib.sha256(data)
        return text

    @property
    def truncated(self) -> bool:
        return self.size > len(self.kept)

    def sha256(self) -> str:
        h = self.hasher if self.hasher is not None else hashlib.sha256(self.kept)
        return str(h.hexdigest())

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


# A body parser is a generator of requests, answered by :class:`_Body`:
#   ("take", n)         -> bytes: the next n bytes (n is small and bounded)
#   ("cstr", text)      -> None: bytes up to the next NUL go into ``text`` (a Text)
#   ("blob", n, text)   -> None: the next n bytes go into ``text``
# It returns its result when done; what is left of the body is skipped.
_Request = tuple[Any, ...]
Parser = Generator[_Request, Any, dict[str, Any]]


class _Short(Exception):
    """The message body ended before its parser did (a malformed message)."""


class _Body:
    """Drives one body parser over the chunks of one message body."""

    __slots__ = ("gen", "need", "remaining", "req", "result", "small")

    def __init__(self, gen: Parser, length: int) -> None:
        self.gen = gen
        self.remaining = length
        self.small = bytearray()
        self.result: dict[str, Any] | None = None
        self.need = 0
        self.req: _Request | None = None
        self._next(None)

    def _next(self, value: Any) -> None:
        while True:
            try:
                req = self.gen.send(value)
            except StopIteration as stop:
                self.result = stop.value
                self.req = None
                return
            self.req = req
            if req[0] == "take":
                if req[1] <= 0:
                    value = b""
                    continue
                self.need = req[1]
                self.small = bytearray()
            elif req[0] == "blob":
                if req[1] <= 0:
                    value = None
                    continue
                self.need = req[1]
            return

    def feed(self, data: memoryview) -> None:
        """Feed body bytes (never more than ``remaining``)."""
        self.remaining -= len(data)
        pos, n = 0, len(data)
        while pos < n and self.req is not None:
            kind = self.req[0]
            if kind == "take":
                take = min(self.need - len(self.small), n - pos)
                self.small += data[pos : pos + take]
                pos += take
                if len(self.small) == self.need:
                    self._next(bytes(self.small))
            elif kind == "cstr":
                text: Text = self.req[1]
                rest = bytes(data[pos:])
                end = rest.find(b"\0")
                if end < 0:
                    text.add(rest)
                    pos = n
                else:
                    text.add(rest[:end])
                    pos += end + 1
                    self._next(None)
            else:  # blob
                text = self.req[2]
                take = min(self.need, n - pos)
                text.add(data[pos : pos + take])
                pos += take
                self.need -= take
                if self.need == 0:
                    self._next(None)

    def finish(self) -> dict[str, Any]:
        """The body is complete: the parser's result (partial if the body was short)."""
        if self.result is not None:
            return self.result
        try:
            self.gen.throw(_Short())
        except StopIteration as stop:
            return dict(stop.value or {}, malformed=True)
        except _Short:
            pass
        return {"malformed": True}


def _i16(b: bytes) -> int:
    return int(_I16.unpack(b)[0])


def _i32(b: bytes) -> int:
    return int(_I32.unpack(b)[0])


# -- body parsers -------------------------------------------------------------------------


def front_parser(kind: int, cap: int, mode: ParameterMode) -> Parser:
    """The parser of a body of ``kind``, one of :data:`FRONT_PARSED`."""
    if kind == QUERY:
        return _parse_query(cap)
    if kind == PARSE:
        return _parse_parse(cap)
    if kind == BIND:
        return _parse_bind(cap, mode)
    if kind == EXECUTE:
        return _parse_execute()
    if kind == CLOSE:
        return _parse_close()
    return _parse_function_call(cap, mode)


def _parse_query(cap: int) -> Parser:
    text = Text(cap)
    try:
        yield ("cstr", text)
    except _Short:
        return {"text": text, "malformed": True}
    return {"text": text}


def _parse_parse(cap: int) -> Parser:
    name = Text(_NAME_CAP)
    text = Text(cap)
    out: dict[str, Any] = {"text": text}
    try:
        yield ("cstr", name)
        yield ("cstr", text)
    except _Short:
        out["malformed"] = True
    return dict(out, name=name.text(), name_len=len(name.kept))


def _param_value(data: Text, binary: bool, mode: ParameterMode) -> Any:
    if mode == "hash":
        return data.sha256()
    value: dict[str, Any]
    raw = bytes(data.kept)
    if not binary:
        try:
            value = {"text": raw.decode("utf-8")}
        except UnicodeDecodeError:
            value = {"hex": raw.hex()}
    else:
        value = {"hex": raw.hex()}
    if data.truncated:
        value.update(truncated=True, bytes=data.size, sha256=data.sha256())
    return value


def _params(
    count: int, formats: list[int], mode: ParameterMode, cap: int
) -> Generator[_Request, Any, dict[str, Any]]:
    values: list[Any] = []
    # What all the parameters of one message keep, together: ``cap`` (32767 parameters of
    # ``cap`` bytes each would otherwise be held at once); past it they are hashed, cut.
    left = cap
    for i in range(count):
        length = _i32((yield ("take", 4)))
        if length < 0:
            values.append(None)
            continue
        # One format code applies to all; else each its own (none given: text).
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        binary = fmt == 1
        if mode == "none":
            yield ("blob", length, _NullText())
            continue
        data = Text(left, always_hash=mode == "hash")
        if length:
            yield ("blob", length, data)
        left -= len(data.kept)
        values.append(_param_value(data, binary, mode))
    fields: dict[str, Any] = {"parameter_count": count}
    if mode != "none":
        fields["parameters"] = values
    return fields


class _NullText(Text):
    """Discards what it is given (parameters with ``parameters = "none"``)."""

    def __init__(self) -> None:
        super().__init__(0)

    def add(self, data: bytes | memoryview) -> None:
        self.size += len(data)


def _parse_bind(cap: int, mode: ParameterMode) -> Parser:
    portal = Text(_NAME_CAP)
    stmt = Text(_NAME_CAP)
    params: dict[str, Any] = {}
    try:
        yield ("cstr", portal)
        yield ("cstr", stmt)
        nfmt = _i16((yield ("take", 2)))
        formats = (
            [_i16(b) for b in _chunks((yield ("take", 2 * max(0, nfmt))), 2)] if nfmt > 0 else []
        )
        count = _i16((yield ("take", 2)))
        params = yield from _params(max(0, count), formats, mode, cap)
    except _Short:
        return dict(_bind_names(portal, stmt), params=params, malformed=True)
    return dict(_bind_names(portal, stmt), params=params)


def _bind_names(portal: Text, stmt: Text) -> dict[str, Any]:
    return {
        "portal": portal.text(),
        "portal_len": len(portal.kept),
        "statement": stmt.text(),
        "statement_len": len(stmt.kept),
    }


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _parse_execute() -> Parser:
    portal = Text(_NAME_CAP)
    try:
        yield ("cstr", portal)
    except _Short:
        return {"portal": portal.text(), "malformed": True}
    return {"portal": portal.text()}


def _parse_close() -> Parser:
    name = Text(_NAME_CAP)
    try:
        what = (yield ("take", 1)).decode("latin-1")
        yield ("cstr", name)
    except _Short:
        return {"what": "", "name": "", "name_len": 0, "malformed": True}
    return {"what": what, "name": name.text(), "name_len": len(name.kept)}


def _parse_function_call(cap: int, mode: ParameterMode) -> Parser:
    out: dict[str, Any] = {"params": {}}
    try:
        out["oid"] = _i32((yield ("take", 4)))
        nfmt = _i16((yield ("take", 2)))
        formats = (
            [_i16(b) for b in _chunks((yield ("take", 2 * max(0, nfmt))), 2)] if nfmt > 0 else []
        )
        count = _i16((yield ("take", 2)))
        out["params"] = yield from _params(max(0, count), formats, mode, cap)
    except _Short:
        out["malformed"] = True
    return out


def back_parser(kind: int) -> Parser:
    """The parser of a body of ``kind``, one of :data:`BACK_PARSED`."""
    if kind == COMMAND_COMPLETE:
        return _parse_tag()
    if kind == ERROR_RESPONSE:
        return _parse_error()
    return _parse_nothing()


def _parse_nothing() -> Parser:
    return {}
    yield ("take", 0)  # pragma: no cover - makes this a generator


def _parse_tag() -> Parser:
    tag = Text(_BACKEND_CAP)
    with contextlib.suppress(_Short):
        yield ("cstr", tag)
    return {"tag": tag.text()}


def _parse_error() -> Parser:
    sqlstate: str | None = None
    with contextlib.suppress(_Short):
        while True:
            code = yield ("take", 1)
            if code in (b"\0", b""):
                break
            value = Text(_BACKEND_CAP)
            yield ("cstr", value)
            if code == b"C":
                sqlstate = value.text()
    return {"sqlstate": sqlstate}


def front_fast(cap: int) -> Callable[[int, bytes], dict[str, Any] | None]:
    """:attr:`Framer.fast` for the frontend: a Query or an Execute whole in one chunk."""

    def fast(kind: int, body: bytes) -> dict[str, Any] | None:
        # Only when the first NUL ends the field where the streaming parser would.
        if kind == QUERY and body and body.find(b"\0") == len(body) - 1:
            return {"text": Text.whole(body[:-1], cap)}
        if kind == EXECUTE:
            nul = body.find(b"\0")
            if nul >= 0 and len(body) - nul == 5:
                return {"portal": body[:nul][:_NAME_CAP].decode("utf-8", "replace")}
        return None

    return fast


def back_fast(kind: int, body: bytes) -> dict[str, Any] | None:
    """:attr:`Framer.fast` for the backend: a CommandComplete whole in one chunk."""
    if (
        kind == COMMAND_COMPLETE
        and body
        and body.find(b"\0") == len(body) - 1
        and len(body) <= _BACKEND_CAP
    ):
        return {"tag": body[:-1].decode("utf-8", "replace")}
    return None


class Framer:
    """Splits one direction into messages: bodies of ``parsed`` types go through their
    parser (bounded memory), the others are skipped; ``on_message(type, result)``."""

    __slots__ = ("body", "fast", "header", "kind", "make", "on_message", "parsed", "skip")

    def __init__(
        self,
        parsed: frozenset[int],
        make: Callable[[int], Parser],
        on_message: Callable[[int, dict[str, Any] | None], None],
        fast: Callable[[int, bytes], dict[str, Any] | None] | None = None,
    ) -> None:
        #: For a whole body in one chunk: the result without a body parser, or None
        #: (then the parser runs).
        self.fast = fast
        self.parsed = parsed
        self.make = make
        self.on_message = on_message
        self.header = bytearray()
        self.skip = 0  # body bytes of the current skipped message still to come
        self.body: _Body | None = None
        self.kind = 0

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        n = len(view)
        pos = 0
        while pos < n:
            body = self.body
            if body is not None:
                take = min(body.remaining, n - pos)
                body.feed(view[pos : pos + take])
                pos += take
                if body.remaining == 0:
                    self.body = None
                    self.on_message(self.kind, body.finish())
                continue
            if self.skip:
                take = min(self.skip, n - pos)
                self.skip -= take
                pos += take
                continue
            if not self.header and n - pos >= 5:
                kind, length = _HEADER.unpack_from(view, pos)
                pos += 5
                size = length - 4 if length > 4 else 0
                if pos + size <= n:  # the whole message is in this chunk
                    if kind not in self.parsed:
                        self.on_message(kind, None)
                        pos += size
                        continue
                    fast = self.fast
                    if fast is not None:
                        result = fast(kind, chunk[pos : pos + size])
                        if result is not None:
                            self.kind = kind
                            self.on_message(kind, result)
                            pos += size
                            continue
                self._start(kind, size)
                continue
            else:
                take = min(5 - len(self.header), n - pos)
                self.header += view[pos : pos + take]
                pos += take
                if len(self.header) < 5:
                    return
                kind, length = _HEADER.unpack(self.header)
                self.header.clear()
            self._start(kind, max(0, length - 4))

    def _start(self, kind: int, size: int) -> None:
        self.kind = kind
        if kind in self.parsed:
            body = _Body(self.make(kind), size)
            if size == 0:
                self.on_message(kind, body.finish())
            else:
                self.body = body
        else:
            self.on_message(kind, None)
            self.skip = size
