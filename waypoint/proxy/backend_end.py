"""A session's end is its backend's end.

Closing the sockets is not enough: PostgreSQL notices a closed client only when it next
reads or writes, so a backend running ``select pg_sleep(30)`` or a ``DO`` loop would run on,
holding its locks, its privileges and a connection, after the client is gone. Whatever ended
the relay (the client closed or was lost, a limit's FATAL, revocation, an identity change, the
drain deadline, a backend or relay error, Waypoint's shutdown), the session task ends its
backend here, within a bound (``backend_end_timeout``, 2 s by default), before it gives its
connection slot back:

1. Terminate: Waypoint ends its side of the backend connection (``shutdown(SHUT_WR)``);
   PostgreSQL reads the end of the stream exactly as a Terminate message (the same branch of
   its main loop) and an idle backend exits at once. Its own end of the connection (EOF on
   our socket) proves it is gone: the server closes a backend's socket only as the process
   exits, after its ``pg_stat_activity`` entry is cleared.
2. If no EOF comes within :data:`TERMINATE_GRACE`, the backend is running a statement: a
   CancelRequest for it (the session's own cancel key, through the cancel-forwarding code).
3. If still no EOF by the bound: ``pg_terminate_backend(pid)`` through the admin pool (the
   admin is a member of every role it provisions), then ``pg_stat_activity`` is polled until
   the pid is gone (bounded again): :func:`waypoint.provision.backends.terminate_pid`.

The outcome (``how``) is counted in ``waypoint_backend_ends_total{reason,how}`` and reported
on the session's one ``connection_end`` log line.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Final, Literal

import attrs
import trio

#: An idle backend exits as soon as it reads the end of the stream; one that has not by
#: then is running a statement and gets a CancelRequest.
TERMINATE_GRACE: Final = 0.1

EndHow = Literal[
    "backend_closed", "terminate", "cancel", "pg_terminate_backend", "unconfirmed", "pooled"
]


@attrs.frozen
class BackendEnd:
    """How a session's backend ended: it closed by itself (``backend_closed``), on Waypoint's
    Terminate (``terminate``), after a CancelRequest (``cancel``), by the admin
    (``pg_terminate_backend``), or could not be confirmed (``unconfirmed``, with why); or it
    did not end: reset and kept in the pool (``pooled``) for the role's next session."""

    how: EndHow
    detail: str | None = None


_GONE_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF})


async def _eof_by(sock: trio.socket.SocketType, deadline: float) -> bool:
    """Read (and drop) what the backend sends until it closes: True, or the deadline: False."""
    with trio.move_on_at(deadline):
        while True:
            try:
                data = await sock.recv(65536)
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    return True
                raise
            if not data:
                return True
    return False


async def stop_backend(
    sock: trio.socket.SocketType | None,
    *,
    closed_by_backend: bool,
    send_cancel: Callable[[], Awaitable[object]] | None,
    terminate: Callable[[float], Awaitable[bool]] | None,
    bound: float,
    grace: float = TERMINATE_GRACE,
) -> BackendEnd:
    """End the backend behind ``sock`` (the raw socket of the backend connection; TLS or not,
    only its end is read). ``send_cancel`` sends the session's CancelRequest;
    ``terminate(wait)`` has the admin terminate the backend and returns whether it is gone
    within ``wait`` seconds. Never raises (except Cancelled); the caller shields it.
    Takes at most ``2 * bound`` plus the admin's own statement bounds."""
    if closed_by_backend:
        return BackendEnd("backend_closed")
    deadline = trio.current_time() + bound
    try:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            if await _eof_by(sock, min(deadline, trio.current_time() + grace)):
                return BackendEnd("terminate")
            if send_cancel is not None:
                with trio.move_on_at(deadline):
                    await send_cancel()
            if await _eof_by(sock, deadline):
                return BackendEnd("cancel")
    except OSError as exc:
        # The socket cannot tell us any more: ask the server.
        detail = f"backend socket: {exc}"
    else:
        detail = "no EOF from the backend"
    if terminate is None:
        return BackendEnd("unconfirmed", detail)
    try:
        gone = await terminate(bound)
    except Exception as exc:
        return BackendEnd("unconfirmed", f"pg_terminate_backend: {type(exc).__name__}: {exc}")
    if gone:
        return BackendEnd("pg_terminate_backend")
    return BackendEnd("unconfirmed", f"still in pg_stat_activity after {bound:g}s")


__all__ = [
    "BackendEnd",
    "EndHow",
    "stop_backend",
]
