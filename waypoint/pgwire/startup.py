"""The first packet a client sends, before any typed message.

It has no type byte: an Int32 length (counting itself, 8..10004 as in
PostgreSQL) and an Int32 code, which is either a protocol version (a
StartupMessage) or one of the special request codes (SSLRequest,
GSSENCRequest, CancelRequest).  A first byte of 0x16 is a TLS ClientHello
(PostgreSQL 17's ``sslnegotiation=direct``): those bytes are not ours to
consume, they are handed back in :class:`DirectTLS` for the TLS layer.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import attrs

from .errors import ProtocolError, UnsupportedProtocolVersion

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_CANCEL_KEY_LENGTH",
    "MAX_FIRST_PACKET_LENGTH",
    "MIN_CANCEL_KEY_LENGTH",
    "MIN_FIRST_PACKET_LENGTH",
    "NEWEST_PROTOCOL",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "DirectTLS",
    "FirstPacket",
    "FirstPacketReader",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "build_cancel_request",
    "build_gssenc_request",
    "build_ssl_request",
    "build_startup_message",
    "parse_first_packet",
]

MIN_FIRST_PACKET_LENGTH: Final = 8
#: PostgreSQL's MAX_STARTUP_PACKET_LENGTH (10000) plus the length word itself.
MAX_FIRST_PACKET_LENGTH: Final = 10004
MIN_CANCEL_KEY_LENGTH: Final = 4
MAX_CANCEL_KEY_LENGTH: Final = 256
#: The newest protocol version this package speaks (PostgreSQL 18).
NEWEST_PROTOCOL: Final = (3, 2)

CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680

_TLS_HANDSHAKE_RECORD: Final = 0x16
_HEAD = struct.Struct("!II")
_PID = struct.Struct("!i")


@attrs.frozen
class SSLRequest:
    """The client asks for TLS.  Answer ``S`` (then TLS) or ``N``.

    Bytes buffered after an SSLRequest and before the TLS handshake were sent
    in plaintext ahead of the answer: the caller must refuse them
    (CVE-2021-23214) — see :attr:`FirstPacketReader.buffered`.
    """


@attrs.frozen
class GSSENCRequest:
    """The client asks for GSSAPI encryption.  Waypoint answers ``N``."""


@attrs.frozen
class CancelRequest:
    """Cancel the query running under the BackendKeyData (pid, secret)."""

    pid: int
    secret: bytes = attrs.field(repr=False)


def _freeze_parameters(parameters: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(parameters))


@attrs.frozen
class StartupMessage:
    """The startup packet: protocol version and the parameters in wire order."""

    protocol: tuple[int, int]
    parameters: Mapping[str, str] = attrs.field(converter=_freeze_parameters, hash=False)

    @property
    def user(self) -> str | None:
        return self.parameters.get("user")

    @property
    def database(self) -> str | None:
        """The ``database`` parameter; PostgreSQL defaults it to the user."""
        return self.parameters.get("database", self.user)

    @property
    def protocol_options(self) -> tuple[str, ...]:
        """Names of the ``_pq_.*`` protocol options the client sent, in order."""
        return tuple(k for k in self.parameters if k.startswith("_pq_."))


@attrs.frozen
class DirectTLS:
    """The connection opens with a TLS handshake record (direct TLS).

    ``data`` holds every byte received so far, unconsumed: hand them to the
    TLS layer before anything read later.
    """

    data: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


FirstPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage | DirectTLS


def parse_first_packet(data: bytes) -> FirstPacket:
    """Parse exactly one complete first packet.

    A first byte of 0x16 gives :class:`DirectTLS` carrying ``data``.  Anything
    incomplete, too long, or with bytes after the packet raises
    :class:`ProtocolError`.
    """
    if data and data[0] == _TLS_HANDSHAKE_RECORD:
        return DirectTLS(bytes(data))
    if len(data) < 4:
        raise ProtocolError(f"incomplete first packet: {len(data)} bytes, no full length word")
    length = _check_length(data)
    if len(data) < length:
        raise ProtocolError(
            f"incomplete first packet: length word says {length} bytes, got {len(data)}"
        )
    if len(data) > length:
        raise ProtocolError(
            f"{len(data) - length} unexpected bytes after a first packet of length {length}"
        )
    return _parse_packet(memoryview(data))


class FirstPacketReader:
    """Incremental reader of first packets.

    Feed bytes with :meth:`feed`, pull one event with :meth:`next_event`
    (None while incomplete).  After SSLRequest or GSSENCRequest answered with
    ``N`` the client sends another first packet on the same stream, so the
    reader goes on; :class:`StartupMessage`, :class:`CancelRequest` and
    :class:`DirectTLS` end it.  Bytes after the ending packet stay available
    through :meth:`take_buffered`.
    """

    __slots__ = ("_buf", "_done", "_events")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False
        self._events = 0

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed by a returned event."""
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Remove and return the unconsumed bytes."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise RuntimeError("FirstPacketReader is finished; read typed messages now")
        self._buf += data

    def next_event(self) -> FirstPacket | None:
        if self._done:
            raise RuntimeError("FirstPacketReader is finished; read typed messages now")
        buf = self._buf
        if not buf:
            return None
        if self._events == 0 and buf[0] == _TLS_HANDSHAKE_RECORD:
            # Not consumed: the bytes stay in the buffer and travel in the event.
            self._done = True
            return DirectTLS(bytes(buf))
        if len(buf) < 4:
            return None
        length = _check_length(buf)
        if len(buf) < length:
            return None
        with memoryview(buf) as view:
            event = _parse_packet(view[:length])
        del buf[:length]
        self._events += 1
        if isinstance(event, StartupMessage | CancelRequest):
            self._done = True
        return event


def _check_length(data: bytes | bytearray | memoryview) -> int:
    length: int = struct.unpack_from("!I", data, 0)[0]
    if not MIN_FIRST_PACKET_LENGTH <= length <= MAX_FIRST_PACKET_LENGTH:
        raise ProtocolError(
            f"invalid length of first packet: {length} "
            f"(must be {MIN_FIRST_PACKET_LENGTH}..{MAX_FIRST_PACKET_LENGTH})"
        )
    return length


def _parse_packet(packet_untrusted: memoryview) -> FirstPacket:
    """``packet_untrusted`` is one whole packet whose length word is checked."""
    length, code = _HEAD.unpack_from(packet_untrusted, 0)
    if code == SSL_REQUEST_CODE:
        _expect_length("SSLRequest", length, 8)
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        _expect_length("GSSENCRequest", length, 8)
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        key_length = length - 12
        if not MIN_CANCEL_KEY_LENGTH <= key_length <= MAX_CANCEL_KEY_LENGTH:
            raise ProtocolError(
                f"invalid CancelRequest length {length}: the cancel key must be "
                f"{MIN_CANCEL_KEY_LENGTH}..{MAX_CANCEL_KEY_LENGTH} bytes, got {key_length}"
            )
        (pid,) = _PID.unpack_from(packet_untrusted, 8)
        return CancelRequest(pid, bytes(packet_untrusted[12:length]))
    major, minor = code >> 16, code & 0xFFFF
    if major == 1234:
        raise ProtocolError(f"unknown request code {major}/{minor} in first packet")
    if major != 3:
        raise UnsupportedProtocolVersion(
            f"unsupported frontend protocol {major}.{minor}: "
            f"server supports 3.0 to {NEWEST_PROTOCOL[0]}.{NEWEST_PROTOCOL[1]}"
        )
    return StartupMessage((major, minor), _parse_parameters(bytes(packet_untrusted[8:length])))


def _expect_length(name: str, length: int, expected: int) -> None:
    if length != expected:
        raise ProtocolError(f"invalid {name} length {length}, expected {expected}")


def _parse_parameters(body_untrusted: bytes) -> dict[str, str]:
    """Parse ``name\\0value\\0 ... \\0``; offsets in messages are from the
    start of the parameter list (packet offset minus 8)."""
    params: dict[str, str] = {}
    pos = 0
    end = len(body_untrusted)
    while True:
        if pos >= end:
            raise ProtocolError("startup packet: parameter list is missing its final terminator")
        name_end = body_untrusted.find(b"\0", pos)
        if name_end < 0:
            raise ProtocolError(
                f"startup packet: unterminated parameter name at offset {pos} of the parameter list"
            )
        if name_end == pos:
            # An empty name is the list terminator; it must be the last byte.
            if pos + 1 != end:
                raise ProtocolError(
                    f"startup packet: empty parameter name at offset {pos} of the "
                    f"parameter list, followed by {end - pos - 1} more bytes"
                )
            return params
        name = _decode(body_untrusted[pos:name_end], f"parameter name at offset {pos}")
        value_start = name_end + 1
        if value_start >= end:
            raise ProtocolError(f"startup packet: parameter {name!r} has no value")
        value_end = body_untrusted.find(b"\0", value_start)
        if value_end < 0:
            raise ProtocolError(f"startup packet: unterminated value of parameter {name!r}")
        if name in params:
            raise ProtocolError(f"startup packet: duplicate parameter {name!r}")
        params[name] = _decode(
            body_untrusted[value_start:value_end], f"value of parameter {name!r}"
        )
        pos = value_end + 1


def _decode(raw_untrusted: bytes, what: str) -> str:
    try:
        return raw_untrusted.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"startup packet: {what} is not valid UTF-8 (byte {exc.start})"
        ) from None


# ---------------------------------------------------------------- builders


def build_startup_message(
    parameters: Mapping[str, str], protocol: tuple[int, int] = (3, 0)
) -> bytes:
    """Serialise a StartupMessage.  Raises ValueError for parameters that
    cannot be sent (empty name, NUL byte, packet above PostgreSQL's limit)."""
    major, minor = protocol
    if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFFFF):
        raise ValueError(f"protocol version out of range: {protocol}")
    parts = [struct.pack("!I", (major << 16) | minor)]
    for name, value in parameters.items():
        if not name:
            raise ValueError("startup parameter names cannot be empty")
        if "\0" in name or "\0" in value:
            raise ValueError(f"startup parameter {name!r} contains a NUL byte")
        parts.append(name.encode("utf-8") + b"\0" + value.encode("utf-8") + b"\0")
    parts.append(b"\0")
    body = b"".join(parts)
    length = len(body) + 4
    if length > MAX_FIRST_PACKET_LENGTH:
        raise ValueError(
            f"startup packet of {length} bytes exceeds the limit of {MAX_FIRST_PACKET_LENGTH}"
        )
    return struct.pack("!I", length) + body


def build_cancel_request(pid: int, secret: bytes) -> bytes:
    """Serialise a CancelRequest (secret of 4..256 bytes, protocol 3.2)."""
    if not MIN_CANCEL_KEY_LENGTH <= len(secret) <= MAX_CANCEL_KEY_LENGTH:
        raise ValueError(
            f"cancel key must be {MIN_CANCEL_KEY_LENGTH}..{MAX_CANCEL_KEY_LENGTH} bytes, "
            f"got {len(secret)}"
        )
    if not -(2**31) <= pid < 2**31:
        raise ValueError(f"process id {pid} does not fit an Int32")
    return _HEAD.pack(12 + len(secret), CANCEL_REQUEST_CODE) + _PID.pack(pid) + secret


def build_ssl_request() -> bytes:
    return _HEAD.pack(8, SSL_REQUEST_CODE)


def build_gssenc_request() -> bytes:
    return _HEAD.pack(8, GSSENC_REQUEST_CODE)
