"""The Prometheus text endpoint: a tiny HTTP/1.1 server (h11) serving ``GET /metrics``."""

from __future__ import annotations

import contextlib

import h11
import trio

from waypoint.observability.log import get_logger
from waypoint.observability.metrics import Metrics

log = get_logger("metrics")

REQUEST_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def _handle(stream: trio.abc.Stream, metrics: Metrics) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    conn.receive_data(bytes(data))
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    if event.method == b"GET" and event.target.split(b"?")[0] == b"/metrics":
                        body = metrics.render()
                        status, ctype = 200, CONTENT_TYPE.encode()
                    else:
                        body, status, ctype = b"not found\n", 404, b"text/plain"
                    headers = [
                        (b"content-type", ctype),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ]
                    await stream.send_all(
                        conn.send(h11.Response(status_code=status, headers=headers))
                    )
                    await stream.send_all(conn.send(h11.Data(data=body)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    return
                return
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
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    addr = listeners[0].socket.getsockname()
    log.info("metrics_listening", address=f"{addr[0]}:{addr[1]}")
    task_status.started((str(addr[0]), int(addr[1])))

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, metrics)

    await trio.serve_listeners(handler, listeners)
