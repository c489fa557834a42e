"""The epoll relay engine: one OS thread for every relayed socket pair.

This module is its trio-facing side: :class:`RelayEngine` (start a relay, the thread's
life) and :func:`open_relay_engine`. The rest is split along its seams:

* loop.py — the engine thread's epoll loop (I/O, back-pressure, epoll interest), over the
  C hot path ``_pump`` (waypoint/proxy/relay/_pump.c);
* core.py — what every relay means (counts, byte budget, FATAL at a boundary,
  flush-then-finish, the verdict), sans I/O, shared with the stream relay;
* client_tls.py — a client's TLS session handed over to the engine, and its records;
* bridge.py — commands from trio to the thread, verdicts back, :class:`RelayHandle`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from waypoint.pgwire.boundary import HeaderCallback

from . import _pump
from .base import RECV_BUFFER_SIZE, TEARDOWN_TIMEOUT, RelayEngineError, check_limits
from .bridge import Commands, RelayHandle, Reporter
from .client_tls import TlsHandover
from .loop import EpollLoop, Relay, wire

if TYPE_CHECKING:
    from waypoint.audit.session import SessionAudit

__all__ = ["RelayEngine", "RelayHandle", "TlsHandover", "open_relay_engine"]


class RelayEngine:
    """One OS thread relaying every plain-socket session with a level-triggered epoll loop.

    Create it with :func:`open_relay_engine`. All public methods are called from the
    trio thread; everything else runs in the engine thread (loop.py).
    """

    def __init__(self, *, recv_buffer_size: int = RECV_BUFFER_SIZE, c_tls: bool = True) -> None:
        if recv_buffer_size < 1024:
            raise ValueError(f"recv_buffer_size must be >= 1024, got {recv_buffer_size}")
        self._commands = Commands()
        self._loop = EpollLoop(recv_buffer_size, self._commands, c_tls=c_tls)
        self._thread: threading.Thread | None = None

    @property
    def _pump(self) -> _pump.Pump:
        return self._loop.pump

    @property
    def _failure(self) -> str | None:
        return self._loop.failure

    @property
    def active_relays(self) -> int:
        """Relays currently registered (a gauge for metrics)."""
        return len(self._loop.relays)

    @property
    def epoll_fileno(self) -> int:
        return self._loop.epoll.fileno()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._loop.failure is None

    def start_relay(
        self,
        client_sock: socket.socket,
        backend_sock: socket.socket,
        *,
        client_tls: TlsHandover | None = None,
        max_bytes: int = 0,
        byte_limit_error: bytes = b"",
        on_client_header: HeaderCallback | None = None,
        on_backend_header: HeaderCallback | None = None,
        initial_to_client: bytes = b"",
        initial_to_backend: bytes = b"",
        c_tls: bool | None = None,
        audit: SessionAudit | None = None,
        stop_at_terminate: bool = False,
    ) -> RelayHandle:
        """Hand two connected sockets to the engine; returns at once.

        ``max_bytes`` (0 = none) bounds the bytes read from both sides together; past
        it the relay ends with ``byte_limit_error`` (a FATAL ErrorResponse) sent to the
        client at a message boundary. ``initial_to_*`` are bytes the handshake already
        read past the start of the relay (they go out first and are counted). Both
        directions start at a message boundary. The sockets are switched to
        non-blocking mode and are never closed by the engine. ``on_*_header(type, length)``
        is called for each message header read from that side (in the engine thread; a
        relay with a hook is served by the Python loop, not the C one).

        ``client_tls``: the client speaks TLS; ``client_sock`` is the raw TCP socket under
        it (see :class:`TlsHandover`), the backend side is plain. The engine decrypts and
        encrypts in its thread: in C without the GIL on the session's own ``SSL*`` when it
        can take it over (client_tls.py), else with the ``SSLObject`` in Python (``c_tls``:
        False keeps this relay's record layer in Python; None: the engine's choice). Byte
        counts, limits and message boundaries are in plaintext; ``initial_to_client`` is
        plaintext (it is encrypted before anything else is sent). No close_notify is sent
        at the end.

        ``stop_at_terminate``: the client's Terminate is not passed on to the backend, and
        the verdict's ``ready_status`` says whether the session ended in step with the
        backend idle (the pool keeps such a backend; see ``RelayResult``).

        ``audit``: record every statement (see :mod:`waypoint.audit`), from the plaintext.
        A relay the C loop serves (plain, or its client TLS record layer in C) stays there:
        it feeds what it reads to the session's C tracker (the relay's bounded audit tap)
        before sending it; with a sink that closes sessions, a client read while the sink
        refuses records goes to Python unsent. Otherwise every read is recorded by Python
        before it is sent.
        """
        if client_tls is not None:
            client_tls.check()
        if not self.running:
            raise RelayEngineError(self._loop.failure or "the relay engine is not running")
        check_limits(max_bytes, byte_limit_error)
        for sock in (client_sock, backend_sock):
            if sock.fileno() < 0:
                raise ValueError("cannot relay a closed socket")
        if client_sock.fileno() == backend_sock.fileno():
            raise ValueError("client and backend must be different sockets")
        client_sock.setblocking(False)
        backend_sock.setblocking(False)
        relay = Relay(
            client_sock,
            backend_sock,
            max_bytes=max_bytes,
            byte_limit_error=byte_limit_error,
            on_client_header=on_client_header,
            on_backend_header=on_backend_header,
            client_tls=client_tls,
            c_tls=self._loop.c_tls if c_tls is None else c_tls,
            audit=audit,
            stop_at_terminate=stop_at_terminate,
        )
        handle = relay.handle = RelayHandle(self._commands, relay)
        client, backend = relay.client, relay.backend
        if client_tls is not None:
            client.out = client_tls.unsent
        relay.core.start(bytes(initial_to_client), bytes(initial_to_backend), time.monotonic())
        if audit is not None and not relay.core.done:
            now = time.monotonic()
            if initial_to_client:
                audit.backend(bytes(initial_to_client), now)
            if initial_to_backend and not audit.client(bytes(initial_to_backend), now):
                relay.core.terminate(audit.fatal, "terminated", 2.0, now)
        if initial_to_backend:
            backend.out = bytes(initial_to_backend)
            client.reading = False
        if initial_to_client:
            client.out += wire(client, bytes(initial_to_client))
            backend.reading = False
        if client.out:  # nothing overtakes what the client is owed first
            backend.reading = False
        if not self._commands.post(("add", relay, None, 0.0)):
            # The engine thread is gone: a relay that never started ends here.
            handle.finished(relay.core.end("terminated", self._loop.failure or "relay engine stopped"))
        return handle

    def _start(self, token: trio.lowlevel.TrioToken) -> None:
        reporter = Reporter(token)
        self._thread = threading.Thread(
            target=self._loop.run, args=(reporter,), name="waypoint-relay", daemon=True
        )
        self._thread.start()

    async def _stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._commands.post(("stop", None, None, 0.0))
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join, TEARDOWN_TIMEOUT)
            if thread.is_alive():  # pragma: no cover - the loop answers within one poll
                raise RelayEngineError("the relay engine thread did not stop in time")
            # Let the completion callbacks the thread scheduled run before we return.
            await trio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def open_relay_engine(
    *, recv_buffer_size: int = RECV_BUFFER_SIZE, c_tls: bool = True
) -> AsyncIterator[RelayEngine]:
    """Run a :class:`RelayEngine` thread for the duration of the block.

    On exit every relay still running ends with reason ``terminated`` and the thread is
    joined (bounded). ``c_tls=False`` keeps client TLS record layers in Python (the
    fallback when the C loop cannot take a session over).
    """
    engine = RelayEngine(recv_buffer_size=recv_buffer_size, c_tls=c_tls)
    engine._start(trio.lowlevel.current_trio_token())
    try:
        yield engine
    finally:
        await engine._stop()
