"""Framing of typed PostgreSQL messages (both directions).

A typed message is one type byte, an Int32 length that counts itself but not
the type byte, and ``length - 4`` bytes of body.  :class:`MessageReader` is a
sans-IO incremental reader: feed it bytes as they arrive, pull complete
messages.
"""

from __future__ import annotations

import struct

import attrs

from .errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Message",
    "MessageReader",
    "build_message",
]

#: PostgreSQL's own ceiling for one message (``PQ_LARGE_MESSAGE_LIMIT``,
#: MaxAllocSize - 1): the largest length word we accept by default.
DEFAULT_MAX_MESSAGE_SIZE = 0x3FFFFFFF - 1

_HEADER = struct.Struct("!cI")

# Compact the buffer once this many consumed bytes sit in front of it (and they
# are more than half of it), so that a long stream costs amortised O(1) per byte.
_COMPACT_THRESHOLD = 64 * 1024


@attrs.frozen
class Message:
    """One typed message: ``type`` is exactly one byte, ``body`` excludes the
    type byte and the length word."""

    type: bytes
    body: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")

    def __attrs_post_init__(self) -> None:
        if len(self.type) != 1:
            raise ValueError(f"a message type is exactly one byte, got {self.type!r}")

    @property
    def raw(self) -> bytes:
        """The message as it travels on the wire."""
        return build_message(self.type, self.body)


def build_message(type_: bytes, body: bytes = b"") -> bytes:
    """Serialise one typed message."""
    if len(type_) != 1:
        raise ValueError(f"a message type is exactly one byte, got {type_!r}")
    length = len(body) + 4
    if length > 0xFFFFFFFF:
        raise ValueError(f"message body of {len(body)} bytes does not fit a length word")
    return _HEADER.pack(type_, length) + body


class MessageReader:
    """Incremental reader of typed messages.

    ``max_message_size`` bounds the length word (which counts itself); a
    length below 4 or above the bound raises :class:`ProtocolError` as soon as
    the header has arrived, before any of the body is buffered.
    """

    __slots__ = ("_buf", "_max", "_pos")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 4:
            raise ValueError(f"max_message_size must be at least 4, got {max_message_size}")
        self._max = max_message_size
        self._buf = bytearray()
        self._pos = 0

    @property
    def max_message_size(self) -> int:
        return self._max

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages (a partial message
        when the peer closes means the stream was cut mid-message)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer."""
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def take_buffered(self) -> bytes:
        """Remove and return every byte not yet returned as a message."""
        data = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return data

    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed."""
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 5:
            return None
        type_, length = _HEADER.unpack_from(buf, pos)
        if length < 4:
            raise ProtocolError(
                f"invalid message length {length} for message type {type_!r} "
                "(the length word counts itself, so it is at least 4)"
            )
        if length > self._max:
            raise ProtocolError(
                f"message of type {type_!r} has length {length}, "
                f"above the limit of {self._max} bytes"
            )
        end = pos + 1 + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            body = bytes(view[pos + 5 : end])
        self._pos = end
        self._compact()
        return Message(type_, body)

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_THRESHOLD and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
