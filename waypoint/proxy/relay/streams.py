"""The trio stream relay: a task per direction over any two ``trio.abc.Stream`` objects
(used when the backend link speaks TLS)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from waypoint.pgwire.boundary import HeaderCallback

from .base import DEFAULT_BOUNDARY_TIMEOUT, RECV_BUFFER_SIZE, RelayResult
from .core import RelayCore, TrackedDirection

if TYPE_CHECKING:
    from waypoint.audit.session import SessionAudit

#: How often a session waiting for the audit sink looks again.
_AUDIT_POLL = 0.02


class StreamRelay:
    """Relay two ``trio.abc.Stream`` objects with a task per direction (a :class:`RelayControl`).

    Same semantics as :meth:`RelayEngine.start_relay`: both are drivers of one
    :class:`~waypoint.proxy.relay.core.RelayCore`, which decides what a read means. The
    relay runs inside :meth:`wait`, in the caller's task. ``terminate`` may be called
    before or while ``wait`` runs. Streams are not closed.
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
        audit: SessionAudit | None = None,
        stop_at_terminate: bool = False,
    ) -> None:
        self._audit = audit
        self._client = client
        self._backend = backend
        self._from_client = TrackedDirection(on_client_header)
        self._from_backend = TrackedDirection(on_backend_header)
        self._core = RelayCore(
            self._from_client,
            self._from_backend,
            max_bytes=max_bytes,
            byte_limit_error=byte_limit_error,
            stop_at_terminate=stop_at_terminate,
        )
        self._initial_to_client = bytes(initial_to_client)
        self._initial_to_backend = bytes(initial_to_backend)
        self._recv_size = recv_buffer_size
        self._in_flight = 0
        self._started = False
        self._outer: trio.CancelScope | None = None
        #: The scopes of the receives in progress (cancelled when the relay's state changes).
        self._client_recv: trio.CancelScope | None = None
        self._backend_recv: trio.CancelScope | None = None

    @property
    def bytes_from_client(self) -> int:
        return self._from_client.received

    @property
    def bytes_from_backend(self) -> int:
        return self._from_backend.received

    @property
    def buffered_bytes(self) -> int:
        return self._in_flight

    @property
    def result(self) -> RelayResult | None:
        return self._core.result

    def terminate(self, fatal: bytes, *, timeout: float = DEFAULT_BOUNDARY_TIMEOUT) -> None:
        if not fatal:
            raise ValueError("terminate needs the FATAL ErrorResponse bytes to send")
        if self._core.terminate(fatal, "terminated", timeout, trio.current_time()):
            self._end_decided()

    # -- reacting to the core ----------------------------------------------------------------

    def _end_decided(self) -> None:
        """The core decided an end: no more client input; the FATAL goes at a boundary."""
        core = self._core
        if self._outer is not None:
            self._outer.deadline = min(self._outer.deadline, core.deadline)
        if self._client_recv is not None:
            self._client_recv.cancel()
        if self._backend_recv is not None and core.fatal_due:
            self._backend_recv.cancel()  # idle at a boundary: inject now

    def _closing(self) -> None:
        """A side closed or failed: stop reading; sends in progress get until the deadline."""
        for scope in (self._client_recv, self._backend_recv):
            if scope is not None:
                scope.cancel()
        if self._outer is not None:
            self._outer.deadline = min(self._outer.deadline, self._core.deadline)

    def _stop(self) -> None:
        """The relay is over (nothing is owed to either side)."""
        assert self._outer is not None
        self._outer.cancel()

    # -- the relay ---------------------------------------------------------------------------

    async def wait(self) -> RelayResult:
        if self._started:
            raise RuntimeError("a StreamRelay runs once")
        self._started = True
        core = self._core
        if core.result is None:
            core.start(self._initial_to_client, self._initial_to_backend, trio.current_time())
        audit = self._audit
        if audit is not None and core.result is None:
            now = trio.current_time()
            if self._initial_to_client:
                audit.backend(self._initial_to_client, now)
            if self._initial_to_backend and not audit.client(self._initial_to_backend, now):
                self.terminate(audit.fatal)
        if core.result is None:
            with trio.CancelScope(deadline=core.deadline) as outer:
                self._outer = outer
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._client_to_backend)
                    nursery.start_soon(self._backend_to_client)
        return core.end()

    async def _send(self, stream: trio.abc.Stream, data: bytes | bytearray, to_client: bool) -> bool:
        """Write to one side; False (and the relay is closing) if that side is gone."""
        self._in_flight += len(data)
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            side = self._from_client if to_client else self._from_backend
            self._core.closed(side, trio.current_time(), _describe(exc, to_client))
            self._closing()
            return False
        finally:
            self._in_flight -= len(data)
        return True

    async def _receive(self, stream: trio.abc.Stream, from_client: bool) -> bytes | None:
        """Read from one side; None at EOF, if that side is gone (the relay is then
        closing), or when the relay's state changed (the caller looks again)."""
        side = self._from_client if from_client else self._from_backend
        with trio.CancelScope() as scope:
            if from_client:
                self._client_recv = scope
            else:
                self._backend_recv = scope
            try:
                data = await stream.receive_some(self._recv_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._core.closed(side, trio.current_time(), _describe(exc, from_client))
                self._closing()
                return None
            finally:
                if from_client:
                    self._client_recv = None
                else:
                    self._backend_recv = None
            if not data:
                self._core.closed(side, trio.current_time())
                self._closing()
                return None
            return bytes(data)
        return None  # cancelled: the relay's state changed

    def _pass_on(self, side: TrackedDirection, data: bytes) -> bytes | None:
        """The core's answer to a read: what to send on, or None when the relay is over."""
        core = self._core
        out = core.read(side, data, trio.current_time())
        if core.result is not None:
            self._stop()
            return None
        if core.terminating:
            self._end_decided()
        return out

    async def _client_to_backend(self) -> None:
        core = self._core
        initial = b"" if core.terminating else self._initial_to_backend
        if initial and not await self._send(self._backend, initial, False):
            return
        audit = self._audit
        while not (core.terminating or core.closing or core.result is not None):
            if audit is not None and await self._audit_hold(audit):
                continue
            data = await self._receive(self._client, True)
            if data is None:
                continue
            out = self._pass_on(self._from_client, data)
            if out and audit is not None and not audit.client(out, trio.current_time()):
                self.terminate(audit.fatal)
                return
            if out and not await self._send(self._backend, out, False):
                return
            if core.terminate_held:
                # The client's Terminate, held back: the session is over (the client may
                # wait for the end of the stream before it closes).
                core.closed(self._from_client, trio.current_time())
                self._closing()
                return

    async def _audit_hold(self, audit: SessionAudit) -> bool:
        """Before reading the client: True when the relay's state may have changed (the
        session waited for the audit sink, or is being ended for it)."""
        if audit.must_close:
            audit.close()
            self.terminate(audit.fatal)
            return True
        if not audit.must_wait:
            return False
        since = trio.current_time()
        while audit.must_wait and not (self._core.terminating or self._core.closing):
            await trio.sleep(_AUDIT_POLL)
        audit.blocked(trio.current_time() - since)
        return True

    async def _backend_to_client(self) -> None:
        core = self._core
        if self._initial_to_client and not await self._send(self._client, self._initial_to_client, True):
            return
        while core.result is None:
            if core.fatal_due:
                fatal = core.take_fatal(trio.current_time())
                if await self._send(self._client, fatal, True):
                    core.client_drained()
                    self._stop()
                return
            if core.closing:
                return
            data = await self._receive(self._backend, False)
            if data is None:
                continue
            out = self._pass_on(self._from_backend, data)
            if out and self._audit is not None:
                self._audit.backend(out, trio.current_time())
            if out and not await self._send(self._client, out, True):
                return


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
