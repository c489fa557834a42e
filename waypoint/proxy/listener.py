"""A listener: accept connections and hand each to its own task (in the sessions nursery, which
outlives the accept loop so that a drain can stop accepting while sessions go on).

Before a connection gets its task, its source address must have fewer than
``[admission] max_handshakes_per_address`` connections still in their handshake; one more is
answered with FATAL 53300 and closed. A transient ``accept()`` error (out of file descriptors
or memory) waits a bounded, doubling back-off, is counted, and is logged once per burst.

A listener's settings live in :class:`CurrentContext`: each accepted connection takes the
context current at its accept and keeps it to its end, so a reload that swaps the context
applies to new connections at once and never changes a session half-way through.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Awaitable, Callable

import trio

from waypoint.observability.log import get_logger
from waypoint.pgwire import build_error_response
from waypoint.proxy.admission import AcceptBackoff, HandshakeTicket
from waypoint.proxy.context import ListenerContext
from waypoint.proxy.session import serve_connection

log = get_logger("listener")

# Transient accept errors: wait and go on.
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

TOO_MANY_HANDSHAKES = build_error_response(
    "FATAL",
    "53300",
    "too many connections from your address are still logging in",
    hint="wait for them to finish, then try again",
)


class CurrentContext:
    """One listener's current :class:`ListenerContext` (a reload swaps it), and how many
    connection tasks each context, current or earlier, still runs."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.current = ctx
        self._tasks: dict[ListenerContext, int] = {}
        self._changed = trio.Event()

    @property
    def name(self) -> str:
        return self.current.listener.name

    def tasks(self, ctx: ListenerContext | None = None) -> int:
        """Connection tasks of ``ctx`` (of every context when None)."""
        if ctx is None:
            return sum(self._tasks.values())
        return self._tasks.get(ctx, 0)

    def contexts(self) -> list[ListenerContext]:
        """The current context and every earlier one with a connection task left."""
        return [self.current, *(c for c in self._tasks if c is not self.current)]

    def enter(self) -> ListenerContext:
        ctx = self.current
        self._tasks[ctx] = self._tasks.get(ctx, 0) + 1
        return ctx

    def leave(self, ctx: ListenerContext) -> None:
        left = self._tasks.get(ctx, 0) - 1
        if left > 0:
            self._tasks[ctx] = left
        else:
            self._tasks.pop(ctx, None)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_idle(self, ctx: ListenerContext | None = None) -> None:
        """Until ``ctx`` (every context, when None) has no connection task left."""
        while self.tasks(ctx):
            await self._changed.wait()


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
    current: ListenerContext | CurrentContext,
    listener: trio.SocketListener,
    sessions: trio.Nursery,
) -> None:
    """Accept on ``listener`` until cancelled; each connection runs in ``sessions`` with the
    context current at its accept."""
    holder = current if isinstance(current, CurrentContext) else CurrentContext(current)
    name = holder.name
    ctx = holder.current
    admission = ctx.admission

    async def admit(stream: trio.SocketStream) -> None:
        ctx = holder.current
        source = peer_address(stream)
        ticket = admission.handshakes.enter(source)
        if ticket is None:
            ctx.metrics.handshake_refused(name)
            admission.handshake_log.record(
                "per_address_limit", source, listener=name, limit=admission.handshakes.per_address
            )
            sessions.start_soon(_turn_away, stream)
            return
        sessions.start_soon(_serve, holder, stream, ticket)

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


async def _serve(
    holder: CurrentContext, stream: trio.SocketStream, ticket: HandshakeTicket
) -> None:
    ctx = holder.enter()
    try:
        await serve_connection(ctx, stream, ticket.release)
    finally:
        ticket.release()
        holder.leave(ctx)


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
