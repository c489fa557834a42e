"""A stand-in backend for cancel forwarding: a listening loopback socket, and what
``forward_cancel`` sends to it when it is a listener's configured backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.pgwire import CancelRequest
from waypoint.proxy.cancel import forward_cancel
from waypoint.state import StateStore


@contextlib.asynccontextmanager
async def listening_socket() -> AsyncIterator[trio.socket.SocketType]:
    """A loopback socket on a free port, listening, closed after the block."""
    sock = trio.socket.socket()
    with sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def listener_for(backend: trio.socket.SocketType) -> ListenerConfig:
    """A listener named ``pg-main`` whose configured backend is ``backend``."""
    return ListenerConfig(
        name="pg-main",
        listen="127.0.0.1:0",
        backend=f"127.0.0.1:{backend.getsockname()[1]}",
        postgres=PostgresListenerConfig(admin_user="a", admin_password="p"),
        backend_tls="disable",
    )


async def forwarded(
    store: StateStore, request: CancelRequest, backend: trio.socket.SocketType
) -> bytes | None:
    """What ``forward_cancel`` sends to the configured backend ``backend`` (None: nothing
    was sent)."""
    received = b""

    async def serve() -> None:
        nonlocal received
        conn, _ = await backend.accept()
        with conn:  # one CancelRequest (its length word first), then close as PostgreSQL does
            while len(received) < 4 or len(received) < int.from_bytes(received[:4], "big"):
                chunk = await conn.recv(512)
                if not chunk:
                    break
                received += chunk

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            sent = await forward_cancel(request, store, listener_for(backend), None)
            if not sent:
                nursery.cancel_scope.cancel()
    return received if sent else None
