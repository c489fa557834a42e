"""The pool's two exchanges with a logged-in backend: the reset before it is kept, and the
check before it is handed out. Each is one simple Query, read to its ReadyForQuery within a
bound; a plaintext backend's socket is peeked at first (:func:`peek`), which finds a backend
the server ended without a round trip.

The check asks the backend for its role's ``VALID UNTIL`` on the server now
(:data:`CHECK_QUERY`). A pooled backend is handed out without a login, so the secret the
caller's credentials hold is never tried; every provision (wherever it runs: another
instance may have given the role a new secret and the memberships of another grant) and
every extension sets a new ``VALID UNTIL``, so the source hands the backend out only while
that value is the one its credentials were set or seen with.

Either one fails (:class:`PooledBackendFailed`, and the caller closes the backend and ends it
on the server) when the backend answers with an error, is not idle afterwards (a reset query
that opens a transaction), asks for COPY, sends anything a simple query cannot produce,
closes the connection, or does not answer within the bound. Asynchronous messages
(notifications of a session that ended, notices) are dropped: they were the previous
client's. The ParameterStatus messages the backend sends are collected: after a reset they
say which reported settings it changed back, so the next client is told the values the
backend holds now.
"""

from __future__ import annotations

import os
import socket
import struct
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Final

import attrs
import trio

from waypoint.pgwire import (
    ErrorResponse,
    MessageReader,
    ParameterStatus,
    ProtocolError,
    ReadyForQuery,
    parse_backend_message,
)
from waypoint.pgwire.framing import build_message

RECV_SIZE: Final = 16 * 1024
#: Most bytes one reset or check may bring back (a reset query is not a report: a query
#: returning more than this is not one).
MAX_ANSWER_BYTES: Final = 1024 * 1024

# Messages a simple query may answer with, besides ParameterStatus, errors and ReadyForQuery:
# CommandComplete, EmptyQueryResponse, RowDescription, DataRow, NoticeResponse,
# NotificationResponse (a previous LISTEN's, dropped).
_QUIET: Final = frozenset({b"C", b"I", b"T", b"D", b"N", b"A"})


_PEEK: Final = socket.MSG_PEEK | socket.MSG_DONTWAIT

#: The check's query: the session user's ``VALID UNTIL`` in seconds since the epoch (a
#: numeric, whatever the session's DateStyle or TimeZone). Every name is qualified and the
#: comparison is pg_catalog's own operator, so nothing the role's own settings bring in (an
#: ``ALTER ROLE ... SET search_path`` of the caller's) can answer in its place.
CHECK_QUERY: Final = (
    "SELECT EXTRACT(EPOCH FROM r.rolvaliduntil) FROM pg_catalog.pg_roles AS r"
    " WHERE r.rolname OPERATOR(pg_catalog.=) session_user"
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class PooledBackendFailed(Exception):
    """The backend cannot be pooled or handed out; close it (the message says why)."""


@attrs.frozen
class RoundTrip:
    """A reset's or check's outcome: the ParameterStatus values the backend reported, in order
    (later ones win), and the first value of the first row the query returned (None: no
    row, or NULL)."""

    parameters: tuple[tuple[str, str], ...] = ()
    first_value: bytes | None = None

    @property
    def valid_until(self) -> datetime | None:
        """The answer to :data:`CHECK_QUERY` as an aware datetime (None: no role, no
        ``VALID UNTIL``, or not a finite number of seconds)."""
        if self.first_value is None:
            return None
        try:
            seconds = Decimal(self.first_value.decode("ascii"))
            return _EPOCH + timedelta(microseconds=int(seconds * 1_000_000))
        except (UnicodeDecodeError, InvalidOperation, ValueError, OverflowError):
            return None


def _first_value(body: bytes) -> bytes | None:
    """The first column of a DataRow body (None for NULL). Raises ProtocolError."""
    try:
        (columns,) = struct.unpack_from("!h", body, 0)
        if columns < 1:
            return None
        (length,) = struct.unpack_from("!i", body, 2)
    except struct.error as exc:
        raise ProtocolError(f"DataRow too short: {exc}") from None
    if length < 0:
        return None
    if 6 + length > len(body):
        raise ProtocolError("DataRow value longer than the message")
    return body[6 : 6 + length]


def build_query(sql: str) -> bytes:
    """A simple-protocol Query message."""
    return build_message(b"Q", sql.encode() + b"\0")


async def round_trip(stream: trio.abc.Stream, sql: str, bound: float) -> RoundTrip:
    """Send ``sql`` as a simple Query and read its answer to a ReadyForQuery that says idle,
    within ``bound`` seconds. Raises :class:`PooledBackendFailed`."""
    reader = MessageReader()
    reported: list[tuple[str, str]] = []
    first: bytes | None = None
    rows = 0
    received = 0
    with trio.move_on_after(bound):
        try:
            await stream.send_all(build_query(sql))
            while True:
                msg = reader.next_message()
                if msg is None:
                    data = await stream.receive_some(RECV_SIZE)
                    if not data:
                        raise PooledBackendFailed("the backend closed the connection")
                    received += len(data)
                    if received > MAX_ANSWER_BYTES:
                        raise PooledBackendFailed(f"answer longer than {MAX_ANSWER_BYTES} bytes")
                    reader.feed(data)
                    continue
                if msg.type == b"D":
                    if rows == 0:
                        first = _first_value(msg.body)
                    rows += 1
                    continue
                if msg.type in _QUIET:
                    continue
                if msg.type not in (b"S", b"E", b"Z"):
                    raise PooledBackendFailed(f"unexpected message {msg.type!r} from the backend")
                parsed = parse_backend_message(msg)
                if isinstance(parsed, ParameterStatus):
                    reported.append((parsed.name, parsed.value))
                elif isinstance(parsed, ErrorResponse):
                    # The rest (ReadyForQuery) is not read: the backend is closed anyway.
                    raise PooledBackendFailed(
                        f"the backend answered {parsed.fields.get('C', '?')}: "
                        f"{parsed.fields.get('M', '')}"
                    )
                elif isinstance(parsed, ReadyForQuery):
                    if parsed.status != b"I":
                        raise PooledBackendFailed(
                            f"the backend is not idle after it (status {parsed.status!r})"
                        )
                    if reader.take_buffered():
                        raise PooledBackendFailed("the backend sent more after ReadyForQuery")
                    return RoundTrip(tuple(reported), first if rows == 1 else None)
        except ProtocolError as exc:
            raise PooledBackendFailed(f"malformed answer: {exc}") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PooledBackendFailed(f"the backend connection broke: {exc}") from exc
    raise PooledBackendFailed(f"no answer within {bound:g}s")


async def reset(stream: trio.abc.Stream, query: str, bound: float) -> RoundTrip:
    """Reset a backend the last session left idle (``pool_reset_query``)."""
    return await round_trip(stream, query, bound)


def peek(sock: trio.socket.SocketType) -> None:
    """Before a pooled plaintext backend is handed out, without a round trip: its socket has
    nothing to read. An idle backend sends nothing unasked; one the server ended while it
    waited (``pg_terminate_backend``, a shutdown) has sent its FATAL and closed, so the socket
    holds those bytes or the end of the stream, and a backend that sent anything else
    unasked is not handed out either. Raises :class:`PooledBackendFailed`.

    Not for a TLS backend: bytes already taken off the socket by the TLS layer are out of
    sight here (those backends get :func:`check`)."""
    # A duplicate of the descriptor for one non-blocking peek (trio's socket has no
    # synchronous receive); the data stays in the kernel for the relay to read.
    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
        try:
            data = dup.recv(1, _PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            raise PooledBackendFailed(f"the backend connection broke: {exc}") from exc
    if not data:
        raise PooledBackendFailed("the backend closed the connection")
    raise PooledBackendFailed("the backend sent data while it was pooled")


async def check(stream: trio.abc.Stream, bound: float) -> RoundTrip:
    """Before a pooled backend is handed out: it answers :data:`CHECK_QUERY` (its role's
    ``VALID UNTIL``, :attr:`RoundTrip.valid_until`), idle, within ``bound``. A backend the
    server ended while it waited (``pg_terminate_backend``, a restart) answers with its
    FATAL or the end of the stream instead."""
    return await round_trip(stream, CHECK_QUERY, bound)


__all__ = [
    "CHECK_QUERY",
    "PooledBackendFailed",
    "RoundTrip",
    "build_query",
    "check",
    "peek",
    "reset",
    "round_trip",
]
