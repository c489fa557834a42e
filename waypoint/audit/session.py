"""One session's audit state, shared by the relay drivers and the session task."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from waypoint import errors
from waypoint.pgwire import build_error_response
from waypoint.proxy.relay._pump import AuditTracker as CTracker

from .messages import ParameterMode
from .sink import AuditSink, bind_openssl_sha256
from .tracker import MAX_AWAITING, SHORT_CONTEXT, context_members


def session_tracker(
    context: Mapping[str, Any],
    *,
    parameters: ParameterMode = "none",
    max_statement_bytes: int = 65536,
    max_session_statement_bytes: int = 4 << 20,
    wall_clock: bool = True,
    max_awaiting: int = MAX_AWAITING,
) -> CTracker:
    """The C tracker of one session (waypoint/proxy/relay/_audit.h; the same records as
    :class:`~waypoint.audit.tracker.AuditTracker`, encoded): ``context`` is the identity
    every record carries, serialized once here."""
    bind_openssl_sha256()
    short = {k: context[k] for k in SHORT_CONTEXT if k in context}
    return CTracker(
        context_members(context).encode(),
        context_members(short).encode(),
        parameters=parameters,
        max_statement_bytes=max_statement_bytes,
        max_session_statement_bytes=max_session_statement_bytes,
        wall_clock=wall_clock,
        max_awaiting=max_awaiting,
    )


def limit_fatal(tracker: CTracker) -> bytes:
    """The FATAL of a session whose tracker is ``limited`` (past ``max_awaiting``)."""
    refusal = errors.audit_awaiting_limit(tracker.max_awaiting)
    return build_error_response("FATAL", refusal.sqlstate, refusal.message)


class SessionAudit:
    """The tracker of one session, the shared sink, and what the relay does when the sink
    cannot take records (``sink.on_error``): wait (``block``) or end the session with
    ``fatal`` (``close``). Driven by one relay thread or task at a time: the relay engine's
    C loop feeds the tracker itself (its audit tap) and the engine thread calls
    :meth:`drain` after each batch. With ``close`` the tracker holds the sink's gate: while
    the sink refuses records the C loop sends no client read before :meth:`client` has
    seen it."""

    __slots__ = (
        "_on_blocked",
        "_on_closed",
        "closed",
        "fatal",
        "last_statement",
        "sink",
        "tracker",
    )

    def __init__(
        self,
        tracker: CTracker,
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
        #: The text of the current or last statement of this session (for the console;
        #: set by the relay's thread at each drain). None before the first one.
        self.last_statement: str | None = None
        self._on_blocked = on_blocked
        self._on_closed = on_closed
        if sink.on_error == "close":
            tracker.refuse_with(sink.gate)

    @property
    def must_wait(self) -> bool:
        """``block``: the queue is full; do not read the client now."""
        return self.sink.on_error == "block" and self.sink.full

    @property
    def must_close(self) -> bool:
        """``close``: the sink is full or failing; end the session rather than go on."""
        return self.sink.on_error == "close" and self.sink.refusing

    def drain(self) -> None:
        """Queue the records the tracker holds (the C loop fed it what it relayed)."""
        tracker = self.tracker
        lines, count = tracker.take()
        if count:
            self.sink.put_encoded(lines, count)
            self.last_statement = tracker.last_statement

    def client(self, data: bytes, now: float) -> bool:
        """Record frontend bytes before they are forwarded. False: they must not be
        forwarded, the session ends with ``fatal`` (``close`` and the sink refuses:
        ``closed`` is then set; or more statements wait for answers than the tracker pairs:
        its ``audit_limit`` record is queued, ``fatal`` is then the limit's)."""
        tracker = self.tracker
        if tracker.queued:
            self.drain()  # what the C loop recorded (and sent) before: queued first
        if tracker.client(data, now) and self.must_close:
            tracker.take()  # not forwarded: the session ends here
            self.close()
            return False
        self.drain()
        if tracker.limited:
            self.fatal = limit_fatal(tracker)
            return False
        return True

    def backend(self, data: bytes, now: float) -> None:
        self.tracker.backend(data, now)
        self.drain()

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
