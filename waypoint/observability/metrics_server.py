"""The metrics listener: a tiny HTTP/1.1 server (h11) serving ``GET /metrics`` (Prometheus text)
and, when the app hands it its health state, ``GET /healthz`` and ``GET /readyz`` (JSON)."""

from __future__ import annotations

import contextlib
from typing import Protocol

import h11
import trio

from waypoint.observability.log import get_logger
from waypoint.observability.metrics import Metrics

log = get_logger("metrics")

REQUEST_TIMEOUT = 5.0
#: Connections the metrics listener serves at once; one more is closed at once. The
#: endpoint needs no identity: without a bound, anyone who can reach it could hold a
#: connection per file descriptor (each for ``REQUEST_TIMEOUT``, then again) and leave the
#: whole process, its database listeners included, without descriptors or memory.
#: Scrapers and health probes make a few requests at a time.
MAX_CONNECTIONS = 64
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE = b"application/json"


class HealthEndpoints(Protocol):
    """What ``/healthz`` and ``/readyz`` answer: (HTTP status, JSON body). ``ready`` bounds
    its own wait (its checks run under a deadline)."""

    def live(self) -> tuple[int, bytes]: ...

    async def ready(self) -> tuple[int, bytes]: ...


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(bytes(data))
            if not data:
                return None
            continue
        return event if isinstance(event, h11.Request) else None


async def _answer(
    request: h11.Request, metrics: Metrics, health: HealthEndpoints | None
) -> tuple[int, bytes, bytes]:
    path = request.target.split(b"?")[0]
    if request.method == b"GET" and path == b"/metrics":
        return 200, CONTENT_TYPE.encode(), metrics.render()
    if request.method == b"GET" and health is not None and path == b"/healthz":
        status, body = health.live()
        return status, JSON_TYPE, body
    if request.method == b"GET" and health is not None and path == b"/readyz":
        status, body = await health.ready()
        return status, JSON_TYPE, body
    return 404, b"text/plain", b"not found\n"


async def _handle(
    stream: trio.abc.Stream,
    metrics: Metrics,
    health: HealthEndpoints | None = None,
    request_timeout: float = REQUEST_TIMEOUT,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        request: h11.Request | None = None
        with trio.move_on_after(request_timeout):
            request = await _read_request(conn, stream)
        if request is None:
            return
        status, ctype, body = await _answer(request, metrics, health)
        headers = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"connection", b"close"),
        ]
        with trio.move_on_after(request_timeout):
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
    except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError) as exc:
        log.debug("metrics_request_failed", error=str(exc))
    finally:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError, OSError),
        ):
            await stream.aclose()


async def serve_metrics(
    host: str,
    port: int,
    metrics: Metrics,
    *,
    health: HealthEndpoints | None = None,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    addr = listeners[0].socket.getsockname()
    log.info("metrics_listening", address=f"{addr[0]}:{addr[1]}")
    task_status.started((str(addr[0]), int(addr[1])))
    serving = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal serving
        if serving >= max_connections:
            # Closed unread (an RST when the peer sent something): nothing waits on it.
            await trio.aclose_forcefully(stream)
            return
        serving += 1
        try:
            await _handle(stream, metrics, health, request_timeout)
        finally:
            serving -= 1

    await trio.serve_listeners(handler, listeners)
