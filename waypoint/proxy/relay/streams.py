"""The trio stream relay: a task per direction over any two ``trio.abc.Stream`` objects
(used when the backend link speaks TLS)."""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from waypoint.pgwire.boundary import BoundaryTracker, HeaderCallback, ProtocolError

from .base import (
    DEFAULT_BOUNDARY_TIMEOUT,
    RECV_BUFFER_SIZE,
    RelayReason,
    RelayResult,
    check_limits,
)


class StreamRelay:
    """Relay two ``trio.abc.Stream`` objects with a task per direction (a :class:`RelayControl`).

    Same semantics as :meth:`RelayEngine.start_relay`; the relay runs inside
    :meth:`wait`, in the caller's task. ``terminate`` may be called before or while
    ``wait`` runs. Streams are not closed.
    """

    def __init__(
        self,
        client: trio.abc.Stream,
        backend: trio.abc.Stream,
        *,
        max_bytes: int = 0,
        byte_limit_error: bytes = b"",
        on_client_header: HeaderCallback | None = None,
        on_backend_header: HeaderCallback | None = None,
        initial_to_client: bytes = b"",
        initial_to_backend: bytes = b"",
        recv_buffer_size: int = RECV_BUFFER_SIZE,
    ) -> None:
        check_limits(max_bytes, byte_limit_error)
        self._client = client
        self._backend = backend
        self._limit = max_bytes if max_bytes > 0 else math.inf
        self._limit_fatal = byte_limit_error
        self._client_tracker = BoundaryTracker(on_client_header)
        self._backend_tracker = BoundaryTracker(on_backend_header)
        self._initial_to_client = bytes(initial_to_client)
        self._initial_to_backend = bytes(initial_to_backend)
        self._recv_size = recv_buffer_size
        self._from_client = 0
        self._from_backend = 0
        self._in_flight = 0
        self._reason: RelayReason | None = None
        self._error: str | None = None
        self._fatal: bytes | None = None
        self._fatal_timeout = DEFAULT_BOUNDARY_TIMEOUT
        self._fatal_sent = False
        self._started = False
        self._outer: trio.CancelScope | None = None
        self._client_reader: trio.CancelScope | None = None
        self._backend_recv: trio.CancelScope | None = None
        self._result: RelayResult | None = None

    @property
    def bytes_from_client(self) -> int:
        return self._from_client

    @property
    def bytes_from_backend(self) -> int:
        return self._from_backend

    @property
    def buffered_bytes(self) -> int:
        return self._in_flight

    @property
    def result(self) -> RelayResult | None:
        return self._result

    def terminate(self, fatal: bytes, *, timeout: float = DEFAULT_BOUNDARY_TIMEOUT) -> None:
        if not fatal:
            raise ValueError("terminate needs the FATAL ErrorResponse bytes to send")
        self._begin_terminate(fatal, "terminated", timeout)

    def _begin_terminate(self, fatal: bytes, reason: RelayReason, timeout: float) -> None:
        if self._fatal is not None or self._reason is not None or self._result is not None:
            return
        self._fatal = fatal
        self._reason = reason
        self._fatal_timeout = timeout
        if self._outer is not None:
            self._outer.deadline = min(self._outer.deadline, trio.current_time() + timeout)
        if self._client_reader is not None:
            self._client_reader.cancel()
        if self._backend_recv is not None and self._backend_tracker.at_boundary:
            self._backend_recv.cancel()  # idle at a boundary: inject now

    def _end(self, reason: RelayReason, error: str | None = None) -> None:
        if self._reason is None:
            self._reason = reason
        if self._error is None:
            self._error = error
        assert self._outer is not None
        self._outer.cancel()

    async def wait(self) -> RelayResult:
        if self._started:
            raise RuntimeError("a StreamRelay runs once")
        self._started = True
        with trio.CancelScope() as outer:
            self._outer = outer
            if self._fatal is not None:
                outer.deadline = trio.current_time() + self._fatal_timeout
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._client_to_backend)
                nursery.start_soon(self._backend_to_client)
        self._result = RelayResult(
            reason=self._reason or "terminated",
            bytes_from_client=self._from_client,
            bytes_from_backend=self._from_backend,
            error=self._error,
            fatal_sent=self._fatal_sent,
            messages_from_client=self._client_tracker.messages,
            messages_from_backend=self._backend_tracker.messages,
        )
        return self._result

    def _count(self, n: int, from_client: bool) -> None:
        if from_client:
            self._from_client += n
        else:
            self._from_backend += n
        if self._from_client + self._from_backend > self._limit:
            self._begin_terminate(self._limit_fatal, "byte_limit", DEFAULT_BOUNDARY_TIMEOUT)

    async def _send(
        self, stream: trio.abc.Stream, data: bytes | bytearray, to_client: bool
    ) -> bool:
        """Write to one side; False (and the relay ends) if that side is gone."""
        self._in_flight += len(data)
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end("client_closed" if to_client else "backend_closed", _describe(exc, to_client))
            return False
        finally:
            self._in_flight -= len(data)
        return True

    async def _receive(
        self, stream: trio.abc.Stream, from_client: bool
    ) -> bytes | bytearray | None:
        """Read from one side; None (and the relay ends) at EOF or if that side is gone."""
        reason: RelayReason = "client_closed" if from_client else "backend_closed"
        try:
            data = await stream.receive_some(self._recv_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end(reason, _describe(exc, from_client))
            return None
        if not data:
            self._end(reason)
            return None
        return data

    async def _send_initial(
        self, data: bytes, tracker: BoundaryTracker, stream: trio.abc.Stream, to_client: bool
    ) -> bool:
        """Bytes the handshake read past the start of the relay: counted, tracked and sent
        before anything else; False if the relay ended."""
        if not data:
            return True
        self._count(len(data), not to_client)
        tracker.feed(data)
        return await self._send(stream, data, to_client)

    async def _client_to_backend(self) -> None:
        tracker = self._client_tracker
        backend = self._backend
        try:
            if not await self._send_initial(self._initial_to_backend, tracker, backend, False):
                return
            with trio.CancelScope() as reader:
                self._client_reader = reader
                if self._fatal is not None:
                    reader.cancel()
                while True:
                    data = await self._receive(self._client, True)
                    if data is None:
                        return
                    self._count(len(data), True)
                    if self._fatal is not None:
                        return  # past the end that was decided: dropped
                    tracker.feed(data)
                    if not await self._send(backend, data, False):
                        return
        except ProtocolError as exc:
            self._end("error", f"client: {exc}")

    async def _backend_to_client(self) -> None:
        tracker = self._backend_tracker
        client = self._client
        try:
            if not await self._send_initial(self._initial_to_client, tracker, client, True):
                return
            while True:
                if self._fatal is not None and tracker.at_boundary:
                    if await self._send(client, self._fatal, True):
                        self._fatal_sent = True
                        self._end("terminated")
                    return
                with trio.CancelScope() as recv_scope:
                    self._backend_recv = recv_scope
                    data = await self._receive(self._backend, False)
                self._backend_recv = None
                if recv_scope.cancelled_caught:
                    continue  # terminate() while idle at a boundary: inject now
                if data is None:
                    return
                self._count(len(data), False)
                if self._fatal is not None:
                    taken = tracker.feed_until_boundary(data)
                    if not await self._send(client, data[:taken], True):
                        return
                    continue
                tracker.feed(data)
                if not await self._send(client, data, True):
                    return
        except ProtocolError as exc:
            self._end("error", f"backend: {exc}")


def _describe(exc: BaseException, client: bool) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return f"{'client' if client else 'backend'} stream: {text}"


async def relay_streams(
    client: trio.abc.Stream,
    backend: trio.abc.Stream,
    *,
    max_bytes: int = 0,
    byte_limit_error: bytes = b"",
    on_client_header: HeaderCallback | None = None,
    on_backend_header: HeaderCallback | None = None,
    on_start: Callable[[StreamRelay], None] | None = None,
) -> RelayResult:
    """Relay two trio streams until one side closes; see :class:`StreamRelay`.

    ``on_start`` receives the :class:`StreamRelay` (the control handle) before relaying
    starts, so another task can ``terminate`` it.
    """
    relay = StreamRelay(
        client,
        backend,
        max_bytes=max_bytes,
        byte_limit_error=byte_limit_error,
        on_client_header=on_client_header,
        on_backend_header=on_backend_header,
    )
    if on_start is not None:
        on_start(relay)
    return await relay.wait()
