"""The bridge between trio and the relay engine's OS thread.

trio → engine: commands (add a relay, terminate or abort one, stop) go through a locked
queue and an eventfd the engine's epoll loop watches. engine → trio: each relay's verdict
is handed to its :class:`RelayHandle` with ``TrioToken.run_sync_soon``. The session task
reads byte counts from the handle while the engine writes them (atomic in ``_pump``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Literal

import trio

from .base import DEFAULT_BOUNDARY_TIMEOUT, TEARDOWN_TIMEOUT, RelayResult

if TYPE_CHECKING:
    from .loop import Relay

CommandKind = Literal["add", "terminate", "abort", "stop"]
Command = tuple[CommandKind, "Relay | None", "bytes | None", float]


class Commands:
    """What trio asks of the engine thread: a queue plus the eventfd that wakes it up."""

    def __init__(self) -> None:
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._queue: deque[Command] = deque()
        self._lock = threading.Lock()
        self._closed = False

    def post(self, command: Command) -> bool:
        """Queue ``command`` and wake the engine; False once the engine thread is gone."""
        with self._lock:
            if self._closed:
                return False
            self._queue.append(command)
            os.eventfd_write(self.wake_fd, 1)
            return True

    def take(self) -> list[Command]:
        """Everything queued (engine thread)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake_fd)
        with self._lock:
            commands = list(self._queue)
            self._queue.clear()
        return commands

    def close(self) -> list[Command]:
        """No more commands: what was still queued (engine thread, on exit)."""
        with self._lock:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
        os.close(self.wake_fd)
        return left


class RelayHandle:
    """The session's handle on one relay run by the engine (a :class:`RelayControl`)."""

    __slots__ = ("_commands", "_done", "_relay", "_result")

    def __init__(self, commands: Commands, relay: Relay) -> None:
        self._commands = commands
        self._relay = relay
        self._done = trio.Event()
        self._result: RelayResult | None = None

    @property
    def bytes_from_client(self) -> int:
        return self._relay.client.received

    @property
    def bytes_from_backend(self) -> int:
        return self._relay.backend.received

    @property
    def buffered_bytes(self) -> int:
        """Bytes the engine holds for this relay, read but not yet written (≤ 2 recv buffers)."""
        relay = self._relay
        return len(relay.client.out) + len(relay.backend.out)

    @property
    def tls_record_layer(self) -> Literal["c", "python"] | None:
        """Where the client's TLS record layer runs: ``c`` (the C loop, on the session's own
        ``SSL*``), ``python`` (the engine thread, in Python), None for a plain client. Fixed
        when the relay starts."""
        tls = self._relay.client.tls
        if tls is None:
            return None
        return "c" if tls.in_c else "python"

    @property
    def result(self) -> RelayResult | None:
        """The verdict once the relay has ended, else None."""
        return self._result

    def terminate(self, fatal: bytes, *, timeout: float = DEFAULT_BOUNDARY_TIMEOUT) -> None:
        if not fatal:
            raise ValueError("terminate needs the FATAL ErrorResponse bytes to send")
        self._commands.post(("terminate", self._relay, fatal, timeout))

    def abort(self) -> None:
        """End the relay at once, without a FATAL (reason ``terminated``). Never blocks."""
        self._commands.post(("abort", self._relay, None, 0.0))

    async def wait(self) -> RelayResult:
        try:
            await self._done.wait()
        except BaseException:
            # Cancelled (or interrupted): tear the relay down before unwinding so that
            # no socket stays registered with the engine after the session closes it.
            self.abort()
            with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT):
                await self._done.wait()
            raise
        assert self._result is not None
        return self._result

    def finished(self, result: RelayResult) -> None:  # runs in the trio thread
        self._result = result
        self._done.set()


class Reporter:
    """Hands verdicts from the engine thread to trio."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token

    def report(self, handle: RelayHandle, result: RelayResult) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(handle.finished, result)
