"""The relay's state machine, sans I/O: one copy of its semantics for every driver.

A :class:`RelayCore` decides; its drivers move bytes. It owns, for one relay:

* the byte counts (``received`` on each :class:`Direction`) and the shared byte budget
  (``max_bytes`` over both directions together);
* termination: the FATAL ErrorResponse that ends the relay, injected toward the client
  exactly at a server→client message boundary (``fatal_due`` / ``take_fatal``); input
  past the decided end is dropped (client) or forwarded only up to the next boundary
  (backend);
* flush-then-finish: after EOF, an error or a queued FATAL, what is owed to the other side
  is still written (bounded by ``deadline``) before the relay ends;
* the verdict (:class:`RelayResult`): the first cause wins.

It does no I/O, keeps no clock (drivers pass ``now``) and never blocks. Drivers: the epoll
engine (engine.py; its C loop, ``_pump.c``, applies the same counting and tracking to
plain bytes on the hot path and hands every other read to this core) and the trio stream
relay (streams.py). tests/test_relay_core.py checks it with no sockets.

A :class:`Direction` is the per-direction state the core drives: the C ``_pump.Lane``
(engine) or :class:`TrackedDirection` (pure Python). Only the client direction's
``budget`` is used: it is the relay's budget (the two C lanes share it).
"""

from __future__ import annotations

import math
from typing import Final, Protocol

from waypoint.pgwire.boundary import BoundaryTracker, HeaderCallback, ProtocolError

from .base import (
    DEFAULT_BOUNDARY_TIMEOUT,
    DEFAULT_FLUSH_TIMEOUT,
    RelayReason,
    RelayResult,
    check_limits,
)

#: The budget when there is no byte limit, and once terminating (every read then takes
#: the slow path: the C loop hands back any read that takes the budget below 0).
NO_LIMIT: Final = 1 << 62
TERMINATING: Final = -(1 << 62)


#: The frontend's Terminate message, whole.
TERMINATE: Final = b"X\x00\x00\x00\x04"
_SYNC_TYPES: Final = frozenset(b"QSF")


class Direction(Protocol):
    """What is read from one side: counted, and tracked for message boundaries (and, for
    the pool, where the stream stands: see ``BoundaryTracker``)."""

    received: int
    budget: int

    @property
    def last_type(self) -> int: ...

    @property
    def prev_type(self) -> int: ...

    @property
    def last_byte(self) -> int: ...

    @property
    def readies(self) -> int: ...

    @property
    def syncs(self) -> int: ...

    @property
    def messages(self) -> int: ...

    @property
    def at_boundary(self) -> bool: ...

    def feed(self, chunk: bytes, /) -> None: ...

    def feed_until_boundary(self, chunk: bytes, /) -> int: ...


class TrackedDirection(BoundaryTracker):
    """A :class:`Direction` in Python (the stream relay, tests)."""

    __slots__ = ("budget", "received")

    def __init__(self, on_header: HeaderCallback | None = None) -> None:
        super().__init__(on_header)
        self.received = 0
        self.budget = 0


class RelayCore:
    """The state machine of one relay (see the module docstring)."""

    __slots__ = (
        "backend",
        "client",
        "closing",
        "deadline",
        "error",
        "fatal",
        "fatal_queued",
        "fatal_sent",
        "limit",
        "limit_fatal",
        "reason",
        "result",
        "stop_at_terminate",
        "terminate_held",
    )

    def __init__(
        self,
        client: Direction,
        backend: Direction,
        *,
        max_bytes: int = 0,
        byte_limit_error: bytes = b"",
        stop_at_terminate: bool = False,
    ) -> None:
        check_limits(max_bytes, byte_limit_error)
        #: The client's Terminate is not passed on (the backend may be pooled); the
        #: verdict says whether the session ended in step (``RelayResult.ready_status``).
        self.stop_at_terminate = stop_at_terminate
        #: The last chunk from the client ended with a whole Terminate, which was held back.
        self.terminate_held = False
        self.client = client
        self.backend = backend
        self.limit = max_bytes if max_bytes > 0 else NO_LIMIT
        self.limit_fatal = byte_limit_error
        client.budget = self.limit
        #: The first cause that ends the relay, and a log-only description.
        self.reason: RelayReason | None = None
        self.error: str | None = None
        #: The FATAL to inject at the next server→client boundary (terminating), or None.
        self.fatal: bytes | None = None
        #: The FATAL was handed to the driver to write (``take_fatal``), and written.
        self.fatal_queued = False
        self.fatal_sent = False
        #: Flushing what is owed before ending (after EOF, an error, or a queued FATAL).
        self.closing = False
        #: When the relay ends whatever is still owed (driver's clock); inf: no bound.
        self.deadline = math.inf
        #: The verdict, once ended.
        self.result: RelayResult | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def terminating(self) -> bool:
        """An end was decided: input toward the backend is no longer passed on."""
        return self.fatal is not None

    @property
    def budget(self) -> int:
        """``max_bytes`` minus the bytes read so far; ``TERMINATING`` once terminating."""
        return self.client.budget

    @property
    def fatal_due(self) -> bool:
        """The FATAL goes next: everything read from the backend ends at a boundary."""
        return (
            self.fatal is not None
            and not self.fatal_queued
            and self.result is None
            and self.backend.at_boundary
        )

    def side_name(self, direction: Direction) -> str:
        return "client" if direction is self.client else "backend"

    # -- input ------------------------------------------------------------------------------

    def start(self, to_client: bytes, to_backend: bytes, now: float) -> None:
        """Bytes the handshake read past the start of the relay (sent first by the
        driver): counted and tracked; past ``max_bytes`` they begin the byte-limit end."""
        for direction, data in ((self.backend, to_client), (self.client, to_backend)):
            if not data:
                continue
            direction.received += len(data)
            self.client.budget -= len(data)
            try:
                direction.feed(data)
            except ProtocolError as exc:
                self.end("error", f"{self.side_name(direction)}: {exc}")
                return
        if self.budget < 0:
            self.terminate(self.limit_fatal, "byte_limit", DEFAULT_BOUNDARY_TIMEOUT, now)

    def read(self, direction: Direction, chunk: bytes, now: float) -> bytes:
        """A chunk read from ``direction``: count it and return what to pass on to the
        other side (``b""``: nothing; the core may have begun terminating or ended)."""
        n = len(chunk)
        direction.received += n
        client = self.client
        client.budget -= n
        if client.budget < 0:  # past max_bytes, or terminating
            return self.read_counted(direction, chunk, now)
        try:
            direction.feed(chunk)
        except ProtocolError as exc:
            self.end("error", f"{self.side_name(direction)}: {exc}")
            return b""
        if self.stop_at_terminate and direction is client:
            if direction.last_type == TERMINATE[0]:
                return self.client_terminate(chunk)
            self.terminate_held = False
        return chunk

    def client_terminate(self, chunk: bytes) -> bytes:
        """A chunk from the client (counted and fed) whose last message header is a
        Terminate, in a relay that stops at it: what goes on to the backend. A chunk that
        ends with the whole Terminate goes on without it (the backend stays, idle, for the
        pool), and the driver then ends the relay as the client closing (``terminate_held``:
        the client may wait for the end of the stream); any other (a Terminate split across
        reads, bytes after it) goes on whole, and the backend ends as without the pool."""
        self.terminate_held = chunk.endswith(TERMINATE) and self.client.at_boundary
        return chunk[: -len(TERMINATE)] if self.terminate_held else chunk

    def read_counted(self, direction: Direction, chunk: bytes, now: float) -> bytes:
        """A chunk already counted that took the budget below 0 (past ``max_bytes``, or
        any read while terminating): what of it still goes to the other side."""
        if self.fatal is None and self.result is None:
            self.terminate(self.limit_fatal, "byte_limit", DEFAULT_BOUNDARY_TIMEOUT, now)
        if self.result is not None or self.fatal_queued or direction is self.client:
            return b""  # input past the end that was decided is dropped
        try:
            taken = direction.feed_until_boundary(chunk)
        except ProtocolError as exc:
            self.end("error", f"{self.side_name(direction)}: {exc}")
            return b""
        return chunk[:taken]

    def terminate(self, fatal: bytes, reason: RelayReason, timeout: float, now: float) -> bool:
        """Decide the end: ``fatal`` goes to the client at the next server→client boundary
        (``fatal_due``), or the relay ends without it ``timeout`` seconds from ``now``.
        The first end wins: False when the relay already has one."""
        if not fatal:
            raise ValueError("terminate needs the FATAL ErrorResponse bytes to send")
        if self.fatal is not None or self.reason is not None or self.result is not None:
            return False
        self.fatal = fatal
        self.reason = reason
        self.client.budget = TERMINATING
        self._bound(now, timeout)
        return True

    def take_fatal(self, now: float) -> bytes:
        """The driver queues the FATAL toward the client now (``fatal_due`` was true);
        from here on the relay only flushes, and then ends."""
        assert self.fatal is not None and not self.fatal_queued
        self.fatal_queued = True
        self.closing = True
        self.deadline = now + DEFAULT_FLUSH_TIMEOUT
        return self.fatal

    def client_drained(self) -> None:
        """Everything queued toward the client was written (the FATAL too, if queued)."""
        if self.fatal_queued:
            self.fatal_sent = True

    def closed(self, direction: Direction, now: float, error: str | None = None, *, gone: bool = True) -> None:
        """EOF from ``direction`` (``error`` None) or a failed socket / stream. ``gone``:
        the peer went away (reset, broken pipe), not an error of ours. The relay then
        only flushes what is owed to the other side (bounded), and ends. A client whose last
        message was a whole Terminate ended the session, even when the backend it went on to
        closes first."""
        if self.reason is None:
            if gone:
                client = self.client
                by_client = direction is client or (
                    client.last_type == TERMINATE[0] and client.at_boundary
                )
                self.reason = "client_closed" if by_client else "backend_closed"
            else:
                self.reason = "error"
            self.error = error
        elif self.error is None:
            self.error = error
        self.closing = True
        self._bound(now, DEFAULT_FLUSH_TIMEOUT)

    def fail(self, error: str) -> None:
        """An error that ends the relay (the first cause wins)."""
        if self.reason is None:
            self.reason = "error"
            self.error = error

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def end(
        self, reason: RelayReason | None = None, error: str | None = None, *, force: bool = False
    ) -> RelayResult:
        """The verdict (idempotent: the first call decides). ``reason`` / ``error`` apply
        only if no cause was recorded before, unless ``force`` (the driver itself failed)."""
        if self.result is not None:
            return self.result
        if force and reason is not None:
            self.reason = reason
            self.error = error
        elif self.reason is None:
            self.reason = reason or "terminated"
            self.error = error
        elif self.error is None:
            self.error = error
        client, backend = self.client, self.backend
        self.result = RelayResult(
            reason=self.reason,
            bytes_from_client=client.received,
            bytes_from_backend=backend.received,
            error=self.error,
            fatal_sent=self.fatal_sent,
            messages_from_client=client.messages,
            messages_from_backend=backend.messages,
            ready_status=self._ready_status(),
        )
        return self.result

    def _ready_status(self) -> bytes | None:
        """See ``RelayResult.ready_status``."""
        client, backend = self.client, self.backend
        if not (
            self.terminate_held
            and self.reason == "client_closed"
            and client.at_boundary
            and backend.at_boundary
            and client.last_type == TERMINATE[0]
            and client.syncs == backend.readies
        ):
            return None
        if client.syncs == 0:
            # Nothing was asked: the backend stands where its login left it, idle, if it
            # sent nothing since.
            return b"I" if backend.last_type == 0 else None
        if client.prev_type not in _SYNC_TYPES or backend.last_type != ord("Z"):
            return None
        if backend.prev_type == ord("E"):
            return None
        return bytes([backend.last_byte])

    def _bound(self, now: float, timeout: float) -> None:
        deadline = now + max(0.0, timeout)
        if deadline < self.deadline:
            self.deadline = deadline
