"""Message-boundary tracking for relayed PostgreSQL v3 traffic (sans-IO).

The relay never parses what it forwards; it only needs to know where one typed
message ends and the next begins, in each direction, so that Waypoint can end a
session with a FATAL ErrorResponse *between* two messages (docs/protocol.md), and
so that a later statement-logging capability can hook on message headers.

Every typed message is ``type (1 byte) + int32 length (counting itself) + body``.
:class:`BoundaryTracker` is fed the relayed chunks in order and skips from header
to header: its cost is proportional to the number of headers in a chunk, never
to the number of bytes (a 1 GiB DataRow costs one header decode). A header may
be split across chunks; the tracker keeps the (at most 4) bytes it has seen.

No I/O, no clock, no threads: the relay engine (``waypoint.proxy.relay``) feeds it
from its loop, tests feed it bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .errors import ProtocolError

__all__ = [
    "BoundaryTracker",
    "HeaderCallback",
    "ProtocolError",
    "bad_length_error",
]

_HEADER = struct.Struct("!Bi")
_HEADER_SIZE = _HEADER.size  # 5
_unpack_header = _HEADER.unpack_from

#: ``on_header(type_byte, length)``: called once per message header, in order.
#: ``length`` counts itself (the body is ``length - 4`` bytes). It runs on the
#: relay's hot path: keep it cheap and never block in it.
HeaderCallback = Callable[[int, int], None]

_READY = ord("Z")
#: The frontend's sync points: each is answered by exactly one ReadyForQuery.
_SYNC_TYPES = frozenset(b"QSF")


class BoundaryTracker:
    """Follows message boundaries in one direction of a v3 byte stream.

    A fresh tracker assumes the stream starts at a message boundary (after the
    startup phase: the relay begins after ReadyForQuery).

    After :class:`~waypoint.pgwire.errors.ProtocolError` the stream is not a v3
    stream any more; the tracker must not be fed again (the relay ends).
    """

    __slots__ = (
        "_header",
        "_skip",
        "last_byte",
        "last_type",
        "messages",
        "on_header",
        "prev_type",
        "readies",
        "syncs",
    )

    def __init__(self, on_header: HeaderCallback | None = None) -> None:
        #: Body bytes of the current message still to be skipped.
        self._skip = 0
        #: Bytes of a header split across chunks (0..4 of them).
        self._header = bytearray()
        #: Number of message headers seen so far.
        self.messages = 0
        #: Optional hook, see :data:`HeaderCallback`; ``None`` costs nothing.
        self.on_header = on_header
        #: Where the stream stands (for the pool: did a session end idle?): the type bytes
        #: of the last two headers (0: none), the last byte fed (a ReadyForQuery's status
        #: when it ends the stream), the ReadyForQuery headers and the frontend sync points
        #: (Query, Sync, FunctionCall; each is answered by one ReadyForQuery) seen.
        self.last_type = 0
        self.prev_type = 0
        self.last_byte = 0
        self.readies = 0
        self.syncs = 0

    @property
    def at_boundary(self) -> bool:
        """True when everything fed so far ends exactly at the end of a message."""
        return self._skip == 0 and not self._header

    def __repr__(self) -> str:
        return (
            f"BoundaryTracker(messages={self.messages}, at_boundary={self.at_boundary}, "
            f"skip={self._skip}, partial_header={len(self._header)})"
        )

    # -- feeding -------------------------------------------------------------------------

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Account for the next ``chunk`` of the stream (any size, including empty)."""
        n = len(chunk)
        if n:
            self.last_byte = chunk[n - 1]
        skip = self._skip
        if skip >= n and not self._header:
            # The whole chunk lies inside the current message body (or is empty).
            self._skip = skip - n
            return
        if self._header:
            pos = self._complete_header(chunk, n)
            if self._header:  # still incomplete: the whole chunk was header bytes
                return
        else:
            pos = skip
        limit = n - _HEADER_SIZE
        if pos <= limit:
            # Skip from header to header (inlined: this runs once per relayed chunk).
            callback = self.on_header
            count = 0
            if callback is None:
                while pos <= limit:
                    type_byte, length = _unpack_header(chunk, pos)
                    if length < 4:
                        self.messages += count
                        raise bad_length_error(type_byte, length)
                    self._note(type_byte)
                    count += 1
                    pos += 1 + length
            else:
                while pos <= limit:
                    type_byte, length = _unpack_header(chunk, pos)
                    if length < 4:
                        self.messages += count
                        raise bad_length_error(type_byte, length)
                    try:
                        callback(type_byte, length)
                    except BaseException:
                        self.messages += count
                        raise
                    self._note(type_byte)
                    count += 1
                    pos += 1 + length
            self.messages += count
        if pos >= n:
            self._skip = pos - n
        else:
            self._skip = 0
            self._header += chunk[pos:n]

    def feed_until_boundary(self, chunk: bytes | bytearray | memoryview) -> int:
        """Consume ``chunk`` only up to the next message boundary; return how many bytes.

        Used to end a relay between two messages: the relay forwards
        ``chunk[:returned]`` and then, if :attr:`at_boundary` is true, injects its
        own message. Returns 0 when the tracker is already at a boundary, and
        ``len(chunk)`` (with :attr:`at_boundary` possibly still false) when no
        boundary is reached inside ``chunk``. At most one header is decoded.
        """
        if self.at_boundary:
            return 0
        n = len(chunk)
        if self._header:
            pos = self._complete_header(chunk, n)
            if self._header:
                return n
        else:
            pos = self._skip
        if pos <= n:
            self._skip = 0
            return pos
        self._skip = pos - n
        return n

    # -- internals -------------------------------------------------------------------------

    def _complete_header(self, chunk: bytes | bytearray | memoryview, n: int) -> int:
        """Add bytes of ``chunk`` to a split header. Returns the position in ``chunk``
        after the body of the completed message (possibly beyond ``n``), or ``n`` if
        the header is still incomplete."""
        header = self._header
        take = min(_HEADER_SIZE - len(header), n)
        header += chunk[:take]
        if len(header) < _HEADER_SIZE:
            return n
        type_byte: int
        length: int
        type_byte, length = _HEADER.unpack_from(header, 0)
        header.clear()
        if length < 4:
            raise bad_length_error(type_byte, length)
        if self.on_header is not None:
            self.on_header(type_byte, length)
        self._note(type_byte)
        self.messages += 1
        return take + length - 4

    def _note(self, type_byte: int) -> None:
        self.prev_type = self.last_type
        self.last_type = type_byte
        if type_byte == _READY:
            self.readies += 1
        elif type_byte in _SYNC_TYPES:
            self.syncs += 1


def bad_length_error(type_byte: int, length: int) -> ProtocolError:
    shown = chr(type_byte) if 0x20 < type_byte < 0x7F else f"0x{type_byte:02x}"
    return ProtocolError(
        f"invalid message length {length} for message type {shown!r} (must be at least 4)"
    )
