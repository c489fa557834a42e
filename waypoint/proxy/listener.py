"""A listener: accept connections and hand each to its own task (in the sessions nursery, which
outlives the accept loop so that a drain can stop accepting while sessions go on).

Before a connection gets its task, its source address must have fewer than
``[admission] max_handshakes_per_address`` connections still in their handshake; one more is
answered with FATAL 53300 and closed. A transient ``accept()`` error (out of file descriptors
or memory) waits a bounded, doubling back-off, is counted, and is logged once per burst.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Awaitable, Callable

import trio

from waypoint.observability.log import get_logger
from waypoint.pgwire import build_error_response
from waypoint.proxy.admission import AcceptBackoff, HandshakeTicket
from waypoint.proxy.session import ListenerContext, serve_connection

log = get_logger("listener")

# Transient accept errors: wait and go on.
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

TOO_MANY_HANDSHAKES = build_error_response(
    "FATAL",
    "53300",
    "too many connections from your address are still logging in",
    hint="wait for them to finish, then try again",
)


async def open_listener(ctx: ListenerContext) -> list[trio.SocketListener]:
    host, port = ctx.listener.listen_address
    return await trio.open_tcp_listeners(port, host=host or None)


def peer_address(stream: trio.SocketStream) -> str:
    """The source IP of an accepted stream (IPv4-mapped IPv6 as plain IPv4)."""
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "?"
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host


async def accept_loop(
    ctx: ListenerContext, listener: trio.SocketListener, sessions: trio.Nursery
) -> None:
    name = ctx.listener.name
    admission = ctx.admission

    async def admit(stream: trio.SocketStream) -> None:
        source = peer_address(stream)
        ticket = admission.handshakes.enter(source)
        if ticket is None:
            ctx.metrics.handshake_refused(name)
            admission.handshake_log.record(
                "per_address_limit", source, listener=name, limit=admission.handshakes.per_address
            )
            sessions.start_soon(_turn_away, stream)
            return
        sessions.start_soon(_serve, ctx, stream, ticket)

    await accept_forever(
        listener,
        admit,
        on_error=lambda exc: ctx.metrics.accept_failed(
            name, errno.errorcode.get(exc.errno or 0, "?")
        ),
        listener_name=name,
    )


async def accept_forever(
    listener: trio.abc.Listener[trio.SocketStream],
    admit: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    on_error: Callable[[OSError], None],
    listener_name: str,
    backoff: AcceptBackoff | None = None,
) -> None:
    """Accept until cancelled. A transient error is counted (``on_error``), waits the back-off
    and is logged once when a burst begins and once when accepting works again."""
    backoff = backoff or AcceptBackoff()
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY:
                raise
            on_error(exc)
            if backoff.failures == 0:
                log.error(
                    "accept_failed",
                    listener=listener_name,
                    error=str(exc),
                    note="retrying with back-off; logged again when accepting works",
                )
            await trio.sleep(backoff.failed())
            continue
        failures = backoff.succeeded()
        if failures:
            log.warning("accept_recovered", listener=listener_name, failures=failures)
        await admit(stream)


async def _serve(ctx: ListenerContext, stream: trio.SocketStream, ticket: HandshakeTicket) -> None:
    try:
        await serve_connection(ctx, stream, ticket.release)
    finally:
        ticket.release()


async def _turn_away(stream: trio.SocketStream) -> None:
    """Answer a connection over the per-address limit and close it, bounded."""
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(TOO_MANY_HANDSHAKES)
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.aclose()
