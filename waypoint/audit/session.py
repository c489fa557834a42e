"""One session's audit state, shared by the relay drivers and the session task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .sink import AuditSink
from .tracker import AuditTracker, Record


class SessionAudit:
    """The tracker of one session, the shared sink, and what the relay does when the sink
    cannot take records (``sink.on_error``): wait (``block``) or end the session with
    ``fatal`` (``close``). Driven by one relay thread or task at a time."""

    __slots__ = ("_on_blocked", "_on_closed", "closed", "fatal", "sink", "tracker")

    def __init__(
        self,
        tracker: AuditTracker,
        sink: AuditSink,
        fatal: bytes,
        *,
        on_blocked: Callable[[float], None] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.tracker = tracker
        self.sink = sink
        self.fatal = fatal
        #: The session was ended because the sink could not take its records.
        self.closed = False
        self._on_blocked = on_blocked
        self._on_closed = on_closed

    @property
    def last_statement(self) -> str | None:
        """The text of the current or last statement of this session (read-only; for
        the console). None before the first one."""
        return self.tracker.last_statement

    @property
    def must_wait(self) -> bool:
        """``block``: the queue is full; do not read the client now."""
        return self.sink.on_error == "block" and self.sink.full

    @property
    def must_close(self) -> bool:
        """``close``: the sink is full or failing; end the session rather than go on."""
        return self.sink.on_error == "close" and self.sink.refusing

    def client(self, data: bytes, now: float) -> bool:
        """Record frontend bytes before they are forwarded. False: they must not be
        forwarded (``close`` and the sink refuses; ``closed`` is then set)."""
        records = self.tracker.client(data, now)
        if records:
            if self.must_close:
                self.close()
                return False
            self.sink.put(records)
        return True

    def forwarded(self, from_client: bool, data: bytes, now: float) -> None:
        """Record bytes the relay's C loop already sent (they were held in its bounded
        tap until now): always queued."""
        tracker = self.tracker
        records = tracker.client(data, now) if from_client else tracker.backend(data, now)
        if records:
            self.sink.put(records)

    def backend(self, data: bytes, now: float) -> None:
        records: list[Record] = self.tracker.backend(data, now)
        if records:
            self.sink.put(records)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._on_closed is not None:
                self._on_closed()

    def blocked(self, seconds: float) -> None:
        if self._on_blocked is not None and seconds > 0:
            self._on_blocked(seconds)


def session_context(**fields: Any) -> dict[str, Any]:
    """The identity fields every statement record carries (None values left out)."""
    return {k: v for k, v in fields.items() if v is not None}
