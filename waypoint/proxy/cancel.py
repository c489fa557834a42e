"""CancelRequest forwarding (SPEC §7): no identity lookup, no slot; unknown keys dropped silently."""

from __future__ import annotations

import contextlib
import ssl

import trio

from waypoint.config.model import ListenerConfig
from waypoint.observability.log import get_logger
from waypoint.pgwire import CancelRequest, build_cancel_request, build_ssl_request
from waypoint.state.base import StateStore

log = get_logger("cancel")

CANCEL_TIMEOUT = 5.0


async def forward_cancel(
    request: CancelRequest,
    state: StateStore,
    listener: ListenerConfig,
    ssl_context: ssl.SSLContext | None,
) -> bool:
    """Forward ``request`` to the backend that issued its key. Returns whether it was sent."""
    backend = await state.lookup_cancel_key(request.pid, request.secret)
    if backend is None:
        log.info("cancel_dropped", reason="unknown key", key_len=len(request.secret))
        return False
    host, port = backend
    with trio.move_on_after(CANCEL_TIMEOUT) as scope:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            log.warning("cancel_failed", backend=f"{host}:{port}", error=str(exc))
            return False
        try:
            if ssl_context is not None:
                await stream.send_all(build_ssl_request())
                answer = await stream.receive_some(1)
                if answer == b"S":
                    tls = trio.SSLStream(
                        stream,
                        ssl_context,
                        server_hostname=host if listener.backend_tls == "verify-full" else None,
                    )
                    await tls.do_handshake()
                    stream = tls
                elif answer != b"N" or listener.backend_tls != "prefer":
                    log.warning("cancel_failed", backend=f"{host}:{port}", error="TLS refused")
                    return False
            await stream.send_all(build_cancel_request(request.pid, request.secret))
            # The server closes the connection once it has processed the request.
            while await stream.receive_some(1024):
                pass
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            log.debug("cancel_connection_closed", error=str(exc))
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(OSError, trio.BrokenResourceError),
            ):
                await stream.aclose()
    if scope.cancelled_caught:
        log.warning("cancel_timeout", backend=f"{host}:{port}")
    log.info("cancel_forwarded", backend=f"{host}:{port}", pid=request.pid)
    return True
