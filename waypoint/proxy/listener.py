"""A listener: accept connections and hand each to its own task (in the sessions nursery, which
outlives the accept loop so that a drain can stop accepting while sessions go on)."""

from __future__ import annotations

import errno

import trio

from waypoint.observability.log import get_logger
from waypoint.proxy.session import ListenerContext, serve_connection

log = get_logger("listener")

# Transient accept errors: wait and go on (as trio.serve_listeners does).
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def open_listener(ctx: ListenerContext) -> list[trio.SocketListener]:
    host, port = ctx.listener.listen_address
    return await trio.open_tcp_listeners(port, host=host or None)


async def accept_loop(
    ctx: ListenerContext, listener: trio.SocketListener, sessions: trio.Nursery
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno in _ACCEPT_RETRY:
                log.error("accept_failed", listener=ctx.listener.name, error=str(exc))
                await trio.sleep(0.1)
                continue
            raise
        sessions.start_soon(serve_connection, ctx, stream)
