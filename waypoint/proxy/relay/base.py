"""What both relay implementations share: the verdict, the control protocol, the bounds."""

from __future__ import annotations

from typing import Final, Literal, Protocol

import attrs

RelayReason = Literal["client_closed", "backend_closed", "byte_limit", "terminated", "error"]

#: Bytes read per ``recv_into``; also the bound on what the engine buffers per direction.
RECV_BUFFER_SIZE: Final = 64 * 1024
#: How long ``terminate`` waits for the next server→client boundary before closing without the FATAL.
DEFAULT_BOUNDARY_TIMEOUT: Final = 2.0
#: How long data already read is flushed to the other side after EOF or a FATAL.
DEFAULT_FLUSH_TIMEOUT: Final = 2.0
#: How long a cancelled ``wait()`` / engine shutdown waits for the engine thread to answer.
TEARDOWN_TIMEOUT: Final = 5.0


@attrs.frozen
class RelayResult:
    """The verdict of one relay.

    ``reason`` is the first cause that ended it. ``fatal_sent`` is true when the
    FATAL given to ``terminate`` (or ``byte_limit_error``) was written completely to
    the client. ``error`` is a log-only description (an OS error text or a protocol
    violation; never payload bytes).
    """

    reason: RelayReason
    bytes_from_client: int
    bytes_from_backend: int
    error: str | None = None
    fatal_sent: bool = False
    messages_from_client: int = 0
    messages_from_backend: int = 0
    #: A relay that stops at the client's Terminate (``stop_at_terminate``): the status of
    #: the backend's last ReadyForQuery (``b"I"``, ``b"T"``, ``b"E"``) when the session
    #: ended in step, the backend waiting for its next query: the client closed right after
    #: a Terminate that was not passed on, which followed a sync point (Query, Sync,
    #: FunctionCall) or nothing; every sync point was answered by a ReadyForQuery; that
    #: ReadyForQuery was the last thing the backend sent, and not after an ErrorResponse.
    #: None otherwise (the backend then got the Terminate, or is ended anyway).
    ready_status: bytes | None = None


class RelayEngineError(RuntimeError):
    """The engine is not running (not started, stopped, or its thread failed)."""


class RelayControl(Protocol):
    """What the session task holds while a relay runs, whichever implementation."""

    @property
    def bytes_from_client(self) -> int: ...

    @property
    def bytes_from_backend(self) -> int: ...

    @property
    def buffered_bytes(self) -> int:
        """Bytes read from one side and not yet written to the other (bounded)."""
        ...

    def terminate(self, fatal: bytes, *, timeout: float = DEFAULT_BOUNDARY_TIMEOUT) -> None:
        """End the relay: at the next server→client message boundary send ``fatal`` to
        the client and stop; if no boundary comes within ``timeout`` seconds, stop
        without it. Idempotent: the first call wins. Never blocks."""
        ...

    async def wait(self) -> RelayResult:
        """The verdict. If the caller is cancelled, the relay is torn down first."""
        ...


def check_limits(max_bytes: int, byte_limit_error: bytes) -> None:
    """Validate the byte-limit arguments of either implementation."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 (0 = no limit), got {max_bytes}")
    if max_bytes and not byte_limit_error:
        raise ValueError("max_bytes needs byte_limit_error (the FATAL ErrorResponse to send)")
