"""The app's statement audit: the sink for the whole process, a tracker per session."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from waypoint import errors
from waypoint.config.model import AuditConfig
from waypoint.pgwire import build_error_response

from .session import SessionAudit, session_context, session_tracker
from .sink import AuditSink, FileWriter, LineWriter, StreamWriter

if TYPE_CHECKING:
    from waypoint.observability.metrics import Metrics

#: Records queued between the relay and the writer before sessions wait (or close).
DEFAULT_QUEUE_RECORDS = 10000


class AuditService:
    """Makes each session's :class:`SessionAudit` over the one shared sink."""

    def __init__(
        self, config: AuditConfig, sink: AuditSink, *, instance: str, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.sink = sink
        self.instance = instance
        self._metrics = metrics
        self._fatal = _fatal()

    def for_session(self, **fields: Any) -> SessionAudit:
        """The audit of one session; ``fields`` are the identity every record carries
        (listener, conn_id, client, login, node, node_id, tags, database, role)."""
        metrics = self._metrics
        tracker = session_tracker(
            session_context(instance=self.instance, **fields),
            parameters=self.config.parameters,
            max_statement_bytes=self.config.max_statement_bytes,
            max_session_statement_bytes=self.config.max_session_statement_bytes,
        )
        return SessionAudit(
            tracker,
            self.sink,
            self._fatal,
            on_blocked=metrics.audit_blocked_seconds.inc if metrics is not None else None,
            on_closed=metrics.audit_sessions_closed.inc if metrics is not None else None,
        )


def _fatal() -> bytes:
    refusal = errors.audit_unavailable()
    return build_error_response("FATAL", refusal.sqlstate, refusal.message)


def make_writer(config: AuditConfig) -> LineWriter:
    if config.sink == "stdout":
        return StreamWriter()
    assert config.file is not None  # checked by the config loader
    return FileWriter(config.file, max_size=config.max_size, keep=config.keep)


@contextlib.asynccontextmanager
async def open_audit(
    config: AuditConfig,
    *,
    metrics: Metrics | None = None,
    instance: str | None = None,
    writer: LineWriter | None = None,
    max_queue: int = DEFAULT_QUEUE_RECORDS,
    log_error: Any = None,
) -> AsyncIterator[AuditService | None]:
    """The audit service for the block (None when ``[audit]`` is off: no hook anywhere).
    On exit what is queued is written (bounded) and the writer thread stops."""
    if not config.enabled:
        yield None
        return
    sink = AuditSink(
        writer if writer is not None else make_writer(config),
        on_error=config.on_error,
        max_queue=max_queue,
        on_written=metrics.audit_records.inc if metrics is not None else None,
        on_sink_error=metrics.audit_sink_errors.inc if metrics is not None else None,
        log_error=log_error,
    )
    sink.start()
    try:
        yield AuditService(config, sink, instance=instance or socket.gethostname(), metrics=metrics)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sink.stop)
