"""Typed messages used around login, as attrs values, with builders and parsers.

Backend → frontend: Authentication* ('R'), ParameterStatus ('S'),
BackendKeyData ('K'), ReadyForQuery ('Z'), ErrorResponse ('E'),
NoticeResponse ('N'), NegotiateProtocolVersion ('v').
Frontend → backend: PasswordMessage / SASLInitialResponse / SASLResponse (all
'p'; which one depends on the exchange) and Terminate ('X').

Strings the backend sends are decoded as UTF-8 with ``surrogateescape``: bytes
in another client_encoding survive a parse/build round trip unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final

import attrs

from .errors import ProtocolError
from .framing import Message, build_message
from .startup import MAX_CANCEL_KEY_LENGTH, MIN_CANCEL_KEY_LENGTH

__all__ = [
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationOther",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendKeyData",
    "BackendMessage",
    "ErrorResponse",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "ParameterStatus",
    "PasswordMessage",
    "ReadyForQuery",
    "SASLInitialResponse",
    "SASLResponse",
    "Terminate",
    "build_error_response",
    "parse_backend_message",
    "parse_password_message",
    "parse_sasl_initial_response",
    "parse_sasl_response",
    "parse_terminate",
]

AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

#: Names of the authentication request codes we do not implement (for messages).
AUTH_METHOD_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {2: "KerberosV5", 6: "SCMCredential", 7: "GSSAPI", 8: "GSSContinue", 9: "SSPI"}
)

_I32 = struct.Struct("!i")


def _str_tuple(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


_TEXT = "utf-8"
_ERRORS = "surrogateescape"


def _enc(text: str) -> bytes:
    return text.encode(_TEXT, _ERRORS)


def _dec(raw: bytes) -> str:
    return raw.decode(_TEXT, _ERRORS)


def _cstr(text: str, what: str) -> bytes:
    raw = _enc(text)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte")
    return raw + b"\0"


class _Cursor:
    """Reads a message body front to back; every shortfall is a ProtocolError
    naming the message."""

    __slots__ = ("_body", "_name", "_pos")

    def __init__(self, body_untrusted: bytes, name: str) -> None:
        self._body = body_untrusted
        self._name = name
        self._pos = 0

    def error(self, what: str) -> ProtocolError:
        return ProtocolError(f"malformed {self._name}: {what}")

    def int32(self, what: str) -> int:
        if self._pos + 4 > len(self._body):
            raise self.error(f"truncated before {what}")
        (value,) = _I32.unpack_from(self._body, self._pos)
        self._pos += 4
        return int(value)

    def cstring(self, what: str) -> str:
        end = self._body.find(b"\0", self._pos)
        if end < 0:
            raise self.error(f"unterminated {what}")
        raw = self._body[self._pos : end]
        self._pos = end + 1
        return _dec(raw)

    def byte(self, what: str) -> int:
        if self._pos >= len(self._body):
            raise self.error(f"truncated before {what}")
        value = self._body[self._pos]
        self._pos += 1
        return value

    def rest(self) -> bytes:
        data = self._body[self._pos :]
        self._pos = len(self._body)
        return data

    def take(self, n: int, what: str) -> bytes:
        if self._pos + n > len(self._body):
            raise self.error(f"truncated in {what}")
        data = self._body[self._pos : self._pos + n]
        self._pos += n
        return data

    @property
    def remaining(self) -> int:
        return len(self._body) - self._pos

    def end(self) -> None:
        if self._pos != len(self._body):
            raise self.error(f"{len(self._body) - self._pos} unexpected bytes at the end")


# ------------------------------------------------------------ authentication


@attrs.frozen
class AuthenticationOk:
    def encode(self) -> bytes:
        return build_message(b"R", _I32.pack(AUTH_OK))


@attrs.frozen
class AuthenticationCleartextPassword:
    def encode(self) -> bytes:
        return build_message(b"R", _I32.pack(AUTH_CLEARTEXT))


@attrs.frozen
class AuthenticationMD5Password:
    salt: bytes = attrs.field()

    @salt.validator
    def _check_salt(self, _a: attrs.Attribute[bytes], value: bytes) -> None:
        if len(value) != 4:
            raise ValueError(f"an MD5 salt is 4 bytes, got {len(value)}")

    def encode(self) -> bytes:
        return build_message(b"R", _I32.pack(AUTH_MD5) + self.salt)


@attrs.frozen
class AuthenticationSASL:
    mechanisms: tuple[str, ...] = attrs.field(converter=_str_tuple)

    def encode(self) -> bytes:
        body = _I32.pack(AUTH_SASL)
        for name in self.mechanisms:
            if not name:
                raise ValueError("a SASL mechanism name cannot be empty")
            body += _cstr(name, "SASL mechanism name")
        return build_message(b"R", body + b"\0")


@attrs.frozen
class AuthenticationSASLContinue:
    data: bytes

    def encode(self) -> bytes:
        return build_message(b"R", _I32.pack(AUTH_SASL_CONTINUE) + self.data)


@attrs.frozen
class AuthenticationSASLFinal:
    data: bytes

    def encode(self) -> bytes:
        return build_message(b"R", _I32.pack(AUTH_SASL_FINAL) + self.data)


@attrs.frozen
class AuthenticationOther:
    """An authentication request we do not implement (GSSAPI, SSPI, ...)."""

    code: int
    data: bytes = b""

    @property
    def method_name(self) -> str:
        return AUTH_METHOD_NAMES.get(self.code, f"unknown method {self.code}")

    def encode(self) -> bytes:
        return build_message(b"R", _I32.pack(self.code) + self.data)


def _parse_authentication(body: bytes) -> BackendMessage:
    cur = _Cursor(body, "Authentication message")
    code = cur.int32("the request code")
    if code == AUTH_OK:
        cur.end()
        return AuthenticationOk()
    if code == AUTH_CLEARTEXT:
        cur.end()
        return AuthenticationCleartextPassword()
    if code == AUTH_MD5:
        salt = cur.take(4, "the MD5 salt")
        cur.end()
        return AuthenticationMD5Password(salt)
    if code == AUTH_SASL:
        names: list[str] = []
        while True:
            name = cur.cstring("SASL mechanism list")
            if not name:
                break
            names.append(name)
        cur.end()
        if not names:
            raise cur.error("empty SASL mechanism list")
        return AuthenticationSASL(tuple(names))
    if code == AUTH_SASL_CONTINUE:
        return AuthenticationSASLContinue(cur.rest())
    if code == AUTH_SASL_FINAL:
        return AuthenticationSASLFinal(cur.rest())
    return AuthenticationOther(code, cur.rest())


# ------------------------------------------------------------- session start


@attrs.frozen
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return build_message(
            b"S", _cstr(self.name, "parameter name") + _cstr(self.value, "parameter value")
        )


def _parse_parameter_status(body: bytes) -> ParameterStatus:
    cur = _Cursor(body, "ParameterStatus")
    name = cur.cstring("parameter name")
    value = cur.cstring("parameter value")
    cur.end()
    return ParameterStatus(name, value)


@attrs.frozen
class BackendKeyData:
    """Cancel key: 4 bytes on protocol 3.0, up to 256 on 3.2 (PostgreSQL 18: 32)."""

    pid: int
    secret: bytes = attrs.field(repr=False)

    @secret.validator
    def _check_secret(self, _a: attrs.Attribute[bytes], value: bytes) -> None:
        if not MIN_CANCEL_KEY_LENGTH <= len(value) <= MAX_CANCEL_KEY_LENGTH:
            raise ValueError(
                f"cancel key must be {MIN_CANCEL_KEY_LENGTH}..{MAX_CANCEL_KEY_LENGTH} "
                f"bytes, got {len(value)}"
            )

    def encode(self) -> bytes:
        return build_message(b"K", _I32.pack(self.pid) + self.secret)


def _parse_backend_key_data(body: bytes) -> BackendKeyData:
    cur = _Cursor(body, "BackendKeyData")
    pid = cur.int32("the process id")
    secret = cur.rest()
    if not MIN_CANCEL_KEY_LENGTH <= len(secret) <= MAX_CANCEL_KEY_LENGTH:
        raise cur.error(
            f"cancel key of {len(secret)} bytes "
            f"(must be {MIN_CANCEL_KEY_LENGTH}..{MAX_CANCEL_KEY_LENGTH})"
        )
    return BackendKeyData(pid, secret)


_TRANSACTION_STATUS: Final = frozenset(b"ITE")


@attrs.frozen
class ReadyForQuery:
    """``status`` is b"I" (idle), b"T" (in a transaction) or b"E" (failed transaction)."""

    status: bytes = attrs.field()

    @status.validator
    def _check_status(self, _a: attrs.Attribute[bytes], value: bytes) -> None:
        if len(value) != 1 or value[0] not in _TRANSACTION_STATUS:
            raise ValueError(f"transaction status must be b'I', b'T' or b'E', got {value!r}")

    def encode(self) -> bytes:
        return build_message(b"Z", self.status)


def _parse_ready_for_query(body: bytes) -> ReadyForQuery:
    if len(body) != 1:
        raise ProtocolError(f"malformed ReadyForQuery: body of {len(body)} bytes, expected 1")
    if body[0] not in _TRANSACTION_STATUS:
        raise ProtocolError(f"malformed ReadyForQuery: unknown transaction status {body!r}")
    return ReadyForQuery(body)


@attrs.frozen
class NegotiateProtocolVersion:
    """The server's newest supported minor version for the requested major
    (3), and the protocol options (``_pq_.*``) it did not recognise.

    On the wire the version is the full protocol code, ``(3 << 16) | minor``,
    as PostgreSQL sends it.
    """

    newest_minor: int = attrs.field()
    unrecognized: tuple[str, ...] = attrs.field(converter=_str_tuple, default=())

    @newest_minor.validator
    def _check_minor(self, _a: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"minor protocol version {value} out of range 0..65535")

    @property
    def newest_version(self) -> tuple[int, int]:
        return (3, self.newest_minor)

    def encode(self) -> bytes:
        body = _I32.pack((3 << 16) | self.newest_minor) + _I32.pack(len(self.unrecognized))
        body += b"".join(_cstr(name, "option name") for name in self.unrecognized)
        return build_message(b"v", body)


def _parse_negotiate(body: bytes) -> NegotiateProtocolVersion:
    cur = _Cursor(body, "NegotiateProtocolVersion")
    version = cur.int32("the newest protocol version")
    major, minor = (version >> 16) & 0xFFFF, version & 0xFFFF
    if major != 3:
        raise cur.error(f"protocol version {major}.{minor} is not 3.x")
    count = cur.int32("the option count")
    if count < 0:
        raise cur.error(f"negative option count {count}")
    # Each name needs at least its terminator: a count larger than the rest
    # of the body cannot be honest, whatever it claims.
    if count > cur.remaining:
        raise cur.error(f"option count {count} exceeds the {cur.remaining} remaining bytes")
    names = tuple(cur.cstring(f"option name {i + 1} of {count}") for i in range(count))
    cur.end()
    return NegotiateProtocolVersion(minor, names)


# --------------------------------------------------------- errors and notices


def _freeze_fields(fields: Mapping[str, str]) -> Mapping[str, str]:
    frozen = dict(fields)
    for code, value in frozen.items():
        raw = _enc(code)
        if len(raw) != 1 or raw == b"\0":
            raise ValueError(f"an ErrorResponse field code is one non-NUL byte, got {code!r}")
        if "\0" in value:
            raise ValueError(f"ErrorResponse field {code!r} contains a NUL byte")
    return MappingProxyType(frozen)


@attrs.frozen
class _FieldMessage:
    """Shared shape of ErrorResponse and NoticeResponse: field code → value,
    in wire order."""

    fields: Mapping[str, str] = attrs.field(converter=_freeze_fields, hash=False)

    @property
    def severity(self) -> str | None:
        """The non-localised severity ('V') when present, else 'S'."""
        return self.fields.get("V", self.fields.get("S"))

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str | None:
        return self.fields.get("M")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    def _body(self) -> bytes:
        return b"".join(_enc(k) + _enc(v) + b"\0" for k, v in self.fields.items()) + b"\0"


@attrs.frozen
class ErrorResponse(_FieldMessage):
    def encode(self) -> bytes:
        return build_message(b"E", self._body())


@attrs.frozen
class NoticeResponse(_FieldMessage):
    def encode(self) -> bytes:
        return build_message(b"N", self._body())


def _parse_fields(body: bytes, name: str) -> dict[str, str]:
    cur = _Cursor(body, name)
    fields: dict[str, str] = {}
    while True:
        code = cur.byte("the field list terminator")
        if code == 0:
            break
        key = _dec(bytes([code]))
        value = cur.cstring(f"value of field {key!r}")
        if key in fields:
            raise cur.error(f"duplicate field {key!r}")
        fields[key] = value
    cur.end()
    return fields


def build_error_response(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
    *,
    notice: bool = False,
) -> bytes:
    """An ErrorResponse (or NoticeResponse with ``notice=True``) shaped like
    PostgreSQL's: S (localised severity) and V (severity), C, M, then D and H
    when given."""
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise ValueError(f"a SQLSTATE is five ASCII letters or digits, got {sqlstate!r}")
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail is not None:
        fields["D"] = detail
    if hint is not None:
        fields["H"] = hint
    return (NoticeResponse(fields) if notice else ErrorResponse(fields)).encode()


# ------------------------------------------------------------------ frontend


@attrs.frozen
class PasswordMessage:
    """A cleartext password or an MD5 response.  Never shown in a repr."""

    password: str = attrs.field(repr=False)

    def encode(self) -> bytes:
        return build_message(b"p", _cstr(self.password, "password"))


@attrs.frozen
class SASLInitialResponse:
    mechanism: str
    data: bytes | None = attrs.field(default=None, repr=False)

    def encode(self) -> bytes:
        body = _cstr(self.mechanism, "SASL mechanism name")
        if self.data is None:
            body += _I32.pack(-1)
        else:
            body += _I32.pack(len(self.data)) + self.data
        return build_message(b"p", body)


@attrs.frozen
class SASLResponse:
    data: bytes = attrs.field(repr=False)

    def encode(self) -> bytes:
        return build_message(b"p", self.data)


@attrs.frozen
class Terminate:
    def encode(self) -> bytes:
        return build_message(b"X")


def _expect_type(msg: Message, expected: bytes, name: str) -> None:
    if msg.type != expected:
        raise ProtocolError(f"expected {name} (type {expected!r}), got type {msg.type!r}")


def parse_password_message(msg: Message) -> PasswordMessage:
    _expect_type(msg, b"p", "PasswordMessage")
    cur = _Cursor(msg.body, "PasswordMessage")
    password = cur.cstring("password")
    cur.end()
    return PasswordMessage(password)


def parse_sasl_initial_response(msg: Message) -> SASLInitialResponse:
    _expect_type(msg, b"p", "SASLInitialResponse")
    cur = _Cursor(msg.body, "SASLInitialResponse")
    mechanism = cur.cstring("mechanism name")
    length = cur.int32("the response length")
    if length == -1:
        cur.end()
        return SASLInitialResponse(mechanism, None)
    if length < 0:
        raise cur.error(f"negative response length {length}")
    data = cur.take(length, "the initial response")
    cur.end()
    return SASLInitialResponse(mechanism, data)


def parse_sasl_response(msg: Message) -> SASLResponse:
    _expect_type(msg, b"p", "SASLResponse")
    return SASLResponse(msg.body)


def parse_terminate(msg: Message) -> Terminate:
    _expect_type(msg, b"X", "Terminate")
    if msg.body:
        raise ProtocolError(f"malformed Terminate: {len(msg.body)} unexpected bytes")
    return Terminate()


# ------------------------------------------------------------------ dispatch

BackendMessage = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationOther
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | ErrorResponse
    | NoticeResponse
    | NegotiateProtocolVersion
)


def parse_backend_message(msg: Message) -> BackendMessage:
    """Parse a backend message of the startup phase.  Other types (those of a
    running session) raise ProtocolError: the relay forwards them unparsed."""
    match msg.type:
        case b"R":
            return _parse_authentication(msg.body)
        case b"S":
            return _parse_parameter_status(msg.body)
        case b"K":
            return _parse_backend_key_data(msg.body)
        case b"Z":
            return _parse_ready_for_query(msg.body)
        case b"E":
            return ErrorResponse(_parse_fields(msg.body, "ErrorResponse"))
        case b"N":
            return NoticeResponse(_parse_fields(msg.body, "NoticeResponse"))
        case b"v":
            return _parse_negotiate(msg.body)
    raise ProtocolError(f"unexpected backend message type {msg.type!r} during startup")
