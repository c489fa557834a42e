"""The epoll relay engine: one OS thread for every relayed socket pair.

The common case runs in C (``_pump``, waypoint/proxy/relay/_pump.c); this module is
everything else: hand-over from trio, back-pressure, EOF and errors, byte limits,
FATAL injection at a message boundary, client TLS, commands and the verdict.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Final

import attrs
import trio

from waypoint.pgwire.boundary import HeaderCallback, ProtocolError

from .base import (
    DEFAULT_BOUNDARY_TIMEOUT,
    DEFAULT_FLUSH_TIMEOUT,
    RECV_BUFFER_SIZE,
    TEARDOWN_TIMEOUT,
    RelayEngineError,
    RelayReason,
    RelayResult,
    check_limits,
)

try:
    from . import _pump
except ImportError as exc:  # pragma: no cover - a source tree without the build step
    raise ImportError(
        "waypoint.proxy.relay._pump (the relay's C hot path) is not built: install the "
        "project with pip (a C compiler and the Python headers are needed), e.g. pip install -e ."
    ) from exc

_EPOLLIN: Final = select.EPOLLIN
_EPOLLOUT: Final = select.EPOLLOUT
_EPOLLBAD: Final = select.EPOLLERR | select.EPOLLHUP
#: Events taken per ``epoll.poll`` (the default, FD_SETSIZE - 1, allocates 12 KiB per call).
_MAX_EVENTS: Final = 256
_PEER_GONE_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN}
)


#: ``_Relay.budget`` when there is no byte limit, and once terminating (every read then
#: takes the Python path: the C loop hands back any read that takes the budget below 0).
_NO_LIMIT: Final = 1 << 62
_TERMINATING: Final = -(1 << 62)


class _Side(_pump.Lane):
    """One socket of a relay: what is read from it and what waits to be written to it.

    The C base (``_pump.Lane``) holds what the C loop needs: ``fd``, ``reading``,
    ``received``, the shared byte ``budget`` and the message-boundary tracker
    (``feed``, ``feed_until_boundary``, ``at_boundary``, ``messages``; the semantics of
    :class:`~waypoint.pgwire.boundary.BoundaryTracker`).
    """

    __slots__ = ("is_client", "mask", "out", "peer", "recv", "relay", "send", "sock", "tls")

    def __init__(
        self,
        relay: _Relay,
        sock: socket.socket,
        is_client: bool,
        on_header: HeaderCallback | None = None,
    ) -> None:
        super().__init__(sock.fileno())
        self.hook = on_header
        self.relay = relay
        self.sock = sock
        self.recv = sock.recv
        self.send = sock.send
        self.is_client = is_client
        #: Bytes read from the peer, not yet written to this socket (bounded by one recv).
        self.out: bytes = b""
        #: The epoll mask currently registered (0: not registered).
        self.mask = 0
        self.peer: _Side = self  # set by _Relay.link
        #: The client's TLS session when the client side speaks TLS (engine-thread only).
        self.tls: TlsHandover | None = None


class _Relay:
    """Engine-thread state of one relay. Mutated only by the engine thread, except
    the read-only counters the trio side reads."""

    __slots__ = (
        "backend",
        "client",
        "closing",
        "deadline",
        "done",
        "error",
        "fatal",
        "fatal_queued",
        "fatal_sent",
        "handle",
        "limit",
        "limit_fatal",
        "reason",
        "tls",
    )

    def __init__(self, handle: RelayHandle, max_bytes: int, byte_limit_error: bytes) -> None:
        self.handle = handle
        self.limit = max_bytes if max_bytes > 0 else _NO_LIMIT
        self.limit_fatal = byte_limit_error
        self.client: _Side
        self.backend: _Side
        self.reason: RelayReason | None = None
        self.error: str | None = None
        #: The FATAL to inject at the next server→client boundary (terminating), or None.
        self.fatal: bytes | None = None
        self.fatal_queued = False
        self.fatal_sent = False
        #: Flushing what is owed before ending (after EOF, an error, or a queued FATAL).
        self.closing = False
        #: Monotonic deadline while terminating or flushing; inf otherwise.
        self.deadline = math.inf
        self.done = False
        #: The client side speaks TLS: both sides are served off the plaintext hot path.
        self.tls = False

    def link(self, client: _Side, backend: _Side) -> None:
        self.client = client
        self.backend = backend
        client.link(backend)  # the client lane holds the shared budget
        client.peer = backend
        backend.peer = client
        self.budget = self.limit

    @property
    def budget(self) -> int:
        """``limit`` minus the bytes read so far; forced to ``_TERMINATING`` once
        terminating, so that the hot path needs a single comparison (``< 0``) to leave
        the plain case."""
        return self.client.budget

    @budget.setter
    def budget(self, value: int) -> None:
        self.client.budget = value

    @property
    def pumped(self) -> bool:
        """Served by the C loop: plain sockets, no header hooks."""
        return not self.tls and self.client.hook is None and self.backend.hook is None


@attrs.frozen
class TlsHandover:
    """A client TLS session moved from trio into the engine after its handshake.

    ``ssl_object`` must be a server-side :class:`ssl.SSLObject` whose handshake is
    complete, reading ciphertext from ``incoming`` and writing it to ``outgoing``
    (which must be empty). ``unsent`` is ciphertext produced but not yet sent (trio
    holds back TLS 1.3 session tickets until the first write); it goes out first.
    Ciphertext already in ``incoming`` (pipelined by the client) is decrypted first.
    From the hand-over on, only the engine thread touches these objects.
    """

    ssl_object: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    unsent: bytes = b""


def tls_handover(stream: trio.SSLStream[Any]) -> TlsHandover:
    """The TLS state of a trio ``SSLStream`` (after its handshake) for
    :meth:`RelayEngine.start_relay` (``client_tls``). The stream must not be used
    afterwards.

    Relies on ``trio.SSLStream`` keeping its ``SSLObject`` and memory BIOs in
    ``_ssl_object``, ``_incoming`` and ``_outgoing``, and held-back session tickets in
    ``_delayed_outgoing`` (true for trio 0.2x–0.3x); raises ``ValueError`` if they are
    missing or if the stream still has ciphertext in its outgoing BIO.
    """
    ssl_object = getattr(stream, "_ssl_object", None)
    incoming = getattr(stream, "_incoming", None)
    outgoing = getattr(stream, "_outgoing", None)
    if not (
        isinstance(ssl_object, ssl.SSLObject)
        and isinstance(incoming, ssl.MemoryBIO)
        and isinstance(outgoing, ssl.MemoryBIO)
    ):
        raise ValueError("this trio.SSLStream does not expose its SSLObject and BIOs")
    if outgoing.pending:
        raise ValueError("the TLS stream still has unsent ciphertext")
    delayed = getattr(stream, "_delayed_outgoing", None)
    if delayed is not None and not isinstance(delayed, bytes | bytearray):
        raise ValueError("this trio.SSLStream holds back ciphertext in an unknown form")
    unsent = bytes(delayed or b"")
    if delayed is not None:
        stream._delayed_outgoing = None  # type: ignore[attr-defined]  # now the engine's
    return TlsHandover(ssl_object, incoming, outgoing, unsent)


class RelayHandle:
    """The session's handle on one relay run by :class:`RelayEngine` (a :class:`RelayControl`)."""

    __slots__ = ("_done", "_engine", "_relay", "_result")

    def __init__(self, engine: RelayEngine) -> None:
        self._engine = engine
        self._done = trio.Event()
        self._result: RelayResult | None = None
        self._relay: _Relay

    @property
    def bytes_from_client(self) -> int:
        return self._relay.client.received

    @property
    def bytes_from_backend(self) -> int:
        return self._relay.backend.received

    @property
    def buffered_bytes(self) -> int:
        """Bytes the engine holds for this relay, read but not yet written (≤ 2 recv buffers)."""
        relay = self._relay
        return len(relay.client.out) + len(relay.backend.out)

    @property
    def result(self) -> RelayResult | None:
        """The verdict once the relay has ended, else None."""
        return self._result

    def terminate(self, fatal: bytes, *, timeout: float = DEFAULT_BOUNDARY_TIMEOUT) -> None:
        if not fatal:
            raise ValueError("terminate needs the FATAL ErrorResponse bytes to send")
        self._engine._command(("terminate", self._relay, fatal, timeout))

    def abort(self) -> None:
        """End the relay at once, without a FATAL (reason ``terminated``). Never blocks."""
        self._engine._command(("abort", self._relay, None, 0.0))

    async def wait(self) -> RelayResult:
        try:
            await self._done.wait()
        except BaseException:
            # Cancelled (or interrupted): tear the relay down before unwinding so that
            # no socket stays registered with the engine after the session closes it.
            self.abort()
            with trio.CancelScope(shield=True), trio.move_on_after(TEARDOWN_TIMEOUT):
                await self._done.wait()
            raise
        assert self._result is not None
        return self._result

    def _finished(self, result: RelayResult) -> None:  # runs in the trio thread
        self._result = result
        self._done.set()


_Command = tuple[str, "_Relay | None", "bytes | None", float]


class RelayEngine:
    """One OS thread relaying every plain-socket session with a level-triggered epoll loop.

    Create it with :func:`open_relay_engine`. All public methods are called from the
    trio thread; everything else runs in the engine thread.
    """

    def __init__(self, *, recv_buffer_size: int = RECV_BUFFER_SIZE) -> None:
        if recv_buffer_size < 1024:
            raise ValueError(f"recv_buffer_size must be >= 1024, got {recv_buffer_size}")
        self._token: trio.lowlevel.TrioToken | None = None
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _EPOLLIN)
        self._commands: deque[_Command] = deque()
        #: Sides of plain relays (the hot path) and of relays with a TLS client.
        self._sides: dict[int, _Side] = {}
        self._tls_sides: dict[int, _Side] = {}
        self._relays: set[_Relay] = set()
        self._timed: set[_Relay] = set()
        #: Bytes per read. Every read in Python gets a bytes object of its own, and the C
        #: loop reads into a buffer of its own whose data reports carry copies: no
        #: buffer is shared between relays, so no relay can be handed another's bytes.
        self._recv_size = recv_buffer_size
        #: The C loop over ``_epoll``; it serves the sides of pumped relays.
        self._pump = _pump.Pump(self._epoll.fileno(), recv_buffer_size, _MAX_EVENTS)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._failure: str | None = None

    # -- trio side -------------------------------------------------------------------------

    @property
    def active_relays(self) -> int:
        """Relays currently registered (a gauge for metrics)."""
        return len(self._relays)

    @property
    def epoll_fileno(self) -> int:
        return self._epoll.fileno()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

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
        it (see :func:`tls_handover`), the backend side is plain. The engine decrypts and
        encrypts in its thread. Byte counts, limits and message boundaries are in
        plaintext; ``initial_to_client`` is plaintext (it is encrypted before anything
        else is sent). No close_notify is sent at the end.
        """
        if client_tls is not None:
            if not client_tls.ssl_object.server_side:
                raise ValueError("client_tls must be the server side of the client's TLS session")
            if client_tls.outgoing.pending:
                raise ValueError("client_tls still has unsent ciphertext")
        if not self.running:
            raise RelayEngineError(self._failure or "the relay engine is not running")
        check_limits(max_bytes, byte_limit_error)
        for sock in (client_sock, backend_sock):
            if sock.fileno() < 0:
                raise ValueError("cannot relay a closed socket")
        if client_sock.fileno() == backend_sock.fileno():
            raise ValueError("client and backend must be different sockets")
        client_sock.setblocking(False)
        backend_sock.setblocking(False)
        handle = RelayHandle(self)
        relay = _Relay(handle, max_bytes, byte_limit_error)
        relay.link(
            _Side(relay, client_sock, True, on_client_header),
            _Side(relay, backend_sock, False, on_backend_header),
        )
        if client_tls is not None:
            relay.tls = True
            relay.client.tls = client_tls
            relay.client.out = client_tls.unsent
        if initial_to_backend:
            relay.backend.out = bytes(initial_to_backend)
            relay.client.received = len(initial_to_backend)
            relay.client.feed(initial_to_backend)
            relay.client.reading = False
        if initial_to_client:
            relay.client.out += _wire(relay.client, initial_to_client)
            relay.backend.received = len(initial_to_client)
            relay.backend.feed(initial_to_client)
            relay.backend.reading = False
        if relay.client.out:  # nothing overtakes what the client is owed first
            relay.backend.reading = False
        relay.budget = relay.limit - (relay.client.received + relay.backend.received)
        handle._relay = relay
        self._command(("add", relay, None, 0.0))
        return handle

    def _command(self, command: _Command) -> None:
        with self._lock:
            if not self._closed:
                self._commands.append(command)
                os.eventfd_write(self._wake_fd, 1)
                return
        # The engine thread is gone: a relay that never started ends here.
        kind, relay, _, _ = command
        if kind == "add" and relay is not None:
            self._finish(relay, "terminated", self._failure or "relay engine stopped")

    def _start(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._thread = threading.Thread(
            target=self._thread_main, name="waypoint-relay", daemon=True
        )
        self._thread.start()

    async def _stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._command(("stop", None, None, 0.0))
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join, TEARDOWN_TIMEOUT)
            if thread.is_alive():  # pragma: no cover - the loop answers within one poll
                raise RelayEngineError("the relay engine thread did not stop in time")
            # Let the completion callbacks the thread scheduled run before we return.
            await trio.lowlevel.checkpoint()

    # -- engine thread ---------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: fail every relay loudly rather than hang them
            self._failure = f"relay engine failed: {type(exc).__name__}: {exc}"
            for relay in list(self._relays):
                self._finish(relay, "error", self._failure)
        finally:
            with self._lock:
                self._closed = True
            for relay in list(self._relays):
                self._finish(relay, "terminated", "relay engine stopped")
            while self._commands:
                kind, queued, _, _ = self._commands.popleft()
                if kind == "add" and queued is not None:
                    self._finish(queued, "terminated", self._failure or "relay engine stopped")
            self._epoll.close()
            os.close(self._wake_fd)

    def _loop(self) -> None:
        # The hot path is in C (``_pump.Pump.run``): it waits, and relays every plain
        # readable socket (recv, count, skip headers, send) without the GIL until an
        # event needs Python. What it hands back is dispatched here.
        run = self._pump.run
        sides = self._sides
        timed = self._timed
        wake_fd = self._wake_fd
        monotonic = time.monotonic
        readable = _EPOLLIN
        other_event = self._other_event
        read_plain = self._read_plain
        tls_sides = self._tls_sides
        tls_event = self._tls_event
        while True:
            if timed:
                next_deadline = min(r.deadline for r in timed)
                timeout = max(0.0, next_deadline - monotonic())
            else:
                timeout = -1.0
            for code, fd, events, _n, arg in run(timeout):
                side = sides.get(fd)
                if side is None:
                    side = tls_sides.get(fd)
                    if side is not None:
                        tls_event(side, events)
                    elif fd == wake_fd and self._run_commands():
                        return
                    continue
                if code == _pump.EVENT:
                    # Not plain readability, or a relay the C loop does not serve.
                    if events != readable:
                        if not other_event(side, events):
                            continue
                    elif not side.reading:
                        continue  # stale: this batch already changed the relay
                    read_plain(side)
                elif code == _pump.PARTIAL:
                    assert isinstance(arg, bytes)  # the part the peer did not take
                    self._hold(side, arg)
                elif code == _pump.EOF:
                    self._eof(side)
                elif code == _pump.PAST_END:
                    assert isinstance(arg, bytes)  # the chunk that crossed the budget
                    self._read_past_end(side, arg)
                elif code == _pump.PROTOCOL:
                    assert isinstance(arg, ProtocolError)
                    self._finish(side.relay, "error", f"{_who(side)}: {arg}")
                elif code == _pump.RECV_ERROR:
                    assert isinstance(arg, int)
                    self._socket_error(side, OSError(arg, os.strerror(arg)))
                elif code == _pump.SEND_ERROR:
                    assert isinstance(arg, int)
                    self._socket_error(side.peer, OSError(arg, os.strerror(arg)))
            if timed:
                now = monotonic()
                for relay in [r for r in timed if r.deadline <= now]:
                    self._finish(relay, relay.reason or "terminated", relay.error)

    def _recv(self, side: _Side) -> bytes | None:
        """Read ``side`` once: the chunk (a bytes object of its own), or None when there
        was nothing to read or the side is gone (EOF and errors are dealt with here)."""
        try:
            data = side.recv(self._recv_size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._socket_error(side, exc)
            return None
        if not data:
            self._eof(side)
            return None
        return data

    def _read_plain(self, side: _Side) -> None:
        """Read ``side`` once and pass the chunk on (the C loop's work, in Python: for
        relays with header hooks, and reads that follow another event)."""
        chunk = self._recv(side)
        if chunk is None:
            return
        if not self._account(side, chunk):
            return
        peer = side.peer
        try:
            sent = peer.send(chunk)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._socket_error(peer, exc)
            return
        if sent != len(chunk):
            self._hold(side, chunk[sent:])

    def _account(self, side: _Side, chunk: bytes) -> bool:
        """Count one chunk read from ``side`` against the relay's budget and feed it to the
        boundary tracker; False when it is not to be passed on (past max_bytes or while
        terminating, or malformed: both already dealt with)."""
        n = len(chunk)
        side.received += n
        relay = side.relay
        relay.budget -= n
        if relay.budget < 0:  # past max_bytes, or terminating
            self._read_past_end(side, chunk)
            return False
        try:
            side.feed(chunk)
        except ProtocolError as exc:
            self._finish(relay, "error", f"{_who(side)}: {exc}")
            return False
        return True

    def _hold(self, side: _Side, rest: bytes) -> None:
        """Back-pressure: keep what the peer did not take, stop reading until it drains."""
        peer = side.peer
        peer.out = rest
        side.reading = False
        self._update(side)
        self._update(peer)

    def _other_event(self, side: _Side, events: int) -> bool:
        """Anything but plain readability (writable, HUP, ERR, several at once). Flushes
        what is pending toward ``side``; True when ``side`` should be read now."""
        if side.relay.done:
            return False
        if events & _EPOLLOUT or (events & _EPOLLBAD and side.out):
            self._flush(side)
            if side.relay.done:
                return False
        return side.reading and bool(events & (_EPOLLIN | _EPOLLBAD))

    def _read_past_end(self, side: _Side, chunk: bytes) -> None:
        """A read that took the relay past ``max_bytes``, or any read while terminating."""
        relay = side.relay
        if relay.fatal is None:
            self._begin_terminate(relay, relay.limit_fatal, "byte_limit", DEFAULT_BOUNDARY_TIMEOUT)
        self._read_while_terminating(side, chunk)

    # -- relays with a TLS client (off the plaintext hot path) ---------------------------

    def _tls_event(self, side: _Side, events: int) -> None:
        if side.relay.done:
            return
        if events & _EPOLLOUT or (events & _EPOLLBAD and side.out):
            self._flush(side)
            if side.relay.done:
                return
        if not (side.reading and events & (_EPOLLIN | _EPOLLBAD)):
            return
        if side.is_client:
            self._tls_read(side, True)
        else:
            self._tls_backend_read(side)

    def _tls_backend_read(self, side: _Side) -> None:
        """Plaintext from the backend, encrypted toward the TLS client."""
        chunk = self._recv(side)
        if chunk is not None:
            self._tls_forward(side, chunk)

    def _tls_read(self, side: _Side, receive: bool) -> None:
        """Ciphertext from the TLS client: receive it (if ``receive``), then decrypt and
        forward everything that is complete, until back-pressure or the relay ends."""
        tls = side.tls
        assert tls is not None
        relay = side.relay
        if receive:
            try:
                ciphertext = side.recv(self._recv_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._socket_error(side, exc)
                return
            if not ciphertext:
                tls.incoming.write_eof()
            else:
                tls.incoming.write(ciphertext)
        read = tls.ssl_object.read
        size = self._recv_size
        while side.reading and not relay.done:
            try:
                data = read(size)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof(side)
                return
            except ssl.SSLError as exc:
                self._tls_error(side, exc)
                return
            if not data:
                self._eof(side)
                return
            self._tls_forward(side, data)
        if tls.outgoing.pending and not relay.done:
            # Reading produced records of its own (a key update answer, an alert).
            side.out += tls.outgoing.read()
            self._flush(side)

    def _tls_forward(self, side: _Side, chunk: bytes) -> None:
        """Count, track and pass on one chunk read from ``side`` (plaintext)."""
        if not self._account(side, chunk):
            return
        peer = side.peer
        if peer.tls is not None:
            try:
                data = _wire(peer, chunk)
            except ssl.SSLError as exc:
                self._tls_error(peer, exc)
                return
        else:
            data = chunk
        try:
            sent = peer.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._socket_error(peer, exc)
            return
        if sent != len(data):
            peer.out = data[sent:]
            side.reading = False
            self._update(side)
            self._update(peer)

    def _tls_error(self, side: _Side, exc: ssl.SSLError) -> None:
        relay = side.relay
        if relay.reason is None:
            relay.reason = "error"
            relay.error = f"client TLS: {exc.reason or type(exc).__name__}"
        side.out = b""
        self._closing(relay, side)

    def _run_commands(self) -> bool:
        """Drain the command queue; True when the engine must stop."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        commands = self._commands
        while commands:
            kind, relay, fatal, timeout = commands.popleft()
            if kind == "stop":
                return True
            assert relay is not None
            if kind == "add":
                self._add(relay)
            elif relay.done or relay not in self._relays:
                continue
            elif kind == "terminate":
                assert fatal is not None
                if relay.fatal is None and relay.reason is None:
                    self._begin_terminate(relay, fatal, "terminated", timeout)
            elif kind == "abort":
                self._finish(relay, relay.reason or "terminated", relay.error or "relay aborted")
        return False

    def _add(self, relay: _Relay) -> None:
        for side in (relay.client, relay.backend):
            if side.fd in self._sides or side.fd in self._tls_sides:
                self._finish(relay, "error", f"file descriptor {side.fd} is already being relayed")
                return
        self._relays.add(relay)
        table = self._tls_sides if relay.tls else self._sides
        for side in (relay.client, relay.backend):
            table[side.fd] = side
        if relay.pumped:
            self._pump.add(relay.client)
            self._pump.add(relay.backend)
        for side in (relay.client, relay.backend):
            try:
                self._update(side)
            except OSError as exc:
                self._finish(relay, "error", f"cannot watch {_who(side)} socket: {exc}")
                return
        if relay.budget < 0:  # the handshake's leftovers alone exceed max_bytes
            self._begin_terminate(relay, relay.limit_fatal, "byte_limit", DEFAULT_BOUNDARY_TIMEOUT)
            return
        # Bytes handed over by the handshake: try to write them now.
        for side in (relay.client, relay.backend):
            if side.out and not relay.done:
                self._flush(side)
        client = relay.client
        if client.tls is not None and client.reading and not relay.done:
            self._tls_read(client, False)  # ciphertext the client pipelined after its handshake

    def _update(self, side: _Side) -> None:
        """Register the interest ``side`` needs now. A side that neither reads nor writes
        is unregistered, so that level-triggered HUP/ERR cannot spin the loop."""
        mask = (_EPOLLIN if side.reading else 0) | (_EPOLLOUT if side.out else 0)
        old = side.mask
        if mask == old:
            return
        if mask == 0:
            self._epoll.unregister(side.fd)
        elif old == 0:
            self._epoll.register(side.fd, mask)
        else:
            self._epoll.modify(side.fd, mask)
        side.mask = mask

    def _flush(self, side: _Side) -> None:
        """Write what is pending toward ``side``; resume reading its peer when drained."""
        relay = side.relay
        data = side.out
        try:
            sent = side.send(data)
        except (BlockingIOError, InterruptedError):
            self._update(side)  # make sure write interest is registered
            return
        except OSError as exc:
            self._socket_error(side, exc)
            return
        side.out = data[sent:]
        if side.out:
            self._update(side)
            return
        if relay.fatal_queued and side.is_client:
            relay.fatal_sent = True
        if relay.closing:
            # Done once nothing is left to write.
            if not relay.client.out and not relay.backend.out:
                self._finish(relay, relay.reason or "terminated", relay.error)
            else:
                self._update(side)
            return
        peer = side.peer
        if not (relay.fatal is not None and peer.is_client):
            peer.reading = True
        self._update(side)
        self._update(peer)
        if peer.tls is not None and peer.reading:
            # Decrypted or undecrypted input may wait inside the TLS objects, where
            # epoll cannot see it.
            self._tls_read(peer, False)

    def _begin_terminate(
        self, relay: _Relay, fatal: bytes, reason: RelayReason, timeout: float
    ) -> None:
        relay.fatal = fatal
        relay.reason = reason
        relay.budget = _TERMINATING  # every later read takes the terminating path
        self._set_deadline(relay, timeout)
        client, backend = relay.client, relay.backend
        client.reading = False  # nothing more goes to the backend
        backend.out = b""
        self._update(backend)
        self._update(client)
        if backend.at_boundary:
            self._queue_fatal(relay)

    def _queue_fatal(self, relay: _Relay) -> None:
        """Everything read from the backend ends at a boundary: the FATAL goes next."""
        assert relay.fatal is not None
        client, backend = relay.client, relay.backend
        try:
            client.out += _wire(client, relay.fatal)
        except ssl.SSLError as exc:
            self._tls_error(client, exc)
            return
        relay.fatal_queued = True
        relay.closing = True
        relay.deadline = time.monotonic() + DEFAULT_FLUSH_TIMEOUT
        self._timed.add(relay)
        backend.reading = False
        self._update(backend)
        self._flush(client)

    def _read_while_terminating(self, side: _Side, chunk: bytes) -> None:
        relay = side.relay
        if relay.done or relay.closing or side.is_client:
            return  # input past the end that was decided is dropped
        try:
            taken = side.feed_until_boundary(chunk)
        except ProtocolError as exc:
            self._finish(relay, "error", f"{_who(side)}: {exc}")
            return
        client = relay.client
        try:
            client.out += _wire(client, chunk[:taken])
        except ssl.SSLError as exc:
            self._tls_error(client, exc)
            return
        if side.at_boundary:
            self._queue_fatal(relay)
            return
        # No boundary yet (a long message): forward it all, keep going until the deadline.
        side.reading = False
        self._update(side)
        self._flush(client)

    def _eof(self, side: _Side) -> None:
        relay = side.relay
        if relay.reason is None:
            relay.reason = "client_closed" if side.is_client else "backend_closed"
        self._closing(relay, side)

    def _socket_error(self, side: _Side, exc: OSError) -> None:
        relay = side.relay
        if relay.reason is None:
            if exc.errno in _PEER_GONE_ERRNOS:
                relay.reason = "client_closed" if side.is_client else "backend_closed"
            else:
                relay.reason = "error"
            relay.error = f"{_who(side)} socket: {exc}"
        elif relay.error is None:
            relay.error = f"{_who(side)} socket: {exc}"
        # The broken side can take nothing more; flush what the other one is owed.
        side.out = b""
        self._closing(relay, side)

    def _closing(self, relay: _Relay, gone: _Side) -> None:
        """``gone`` closed: stop reading, flush what is owed to the other side (bounded)."""
        gone.out = b""
        other = gone.peer
        relay.closing = True
        relay.client.reading = relay.backend.reading = False
        if not other.out:
            self._finish(relay, relay.reason or "terminated", relay.error)
            return
        self._set_deadline(relay, DEFAULT_FLUSH_TIMEOUT)
        self._update(gone)
        self._update(other)
        self._flush(other)

    def _set_deadline(self, relay: _Relay, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        if deadline < relay.deadline:
            relay.deadline = deadline
        self._timed.add(relay)

    def _finish(self, relay: _Relay, reason: RelayReason, error: str | None) -> None:
        if relay.done:
            return
        relay.done = True
        for side in (relay.client, relay.backend):
            side.reading = False
            self._pump.discard(side)
            table = self._tls_sides if relay.tls else self._sides
            if table.get(side.fd) is side:
                del table[side.fd]
            if side.mask:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(side.fd)
                side.mask = 0
        self._relays.discard(relay)
        self._timed.discard(relay)
        result = RelayResult(
            reason=reason,
            bytes_from_client=relay.client.received,
            bytes_from_backend=relay.backend.received,
            error=error,
            fatal_sent=relay.fatal_sent,
            messages_from_client=relay.client.messages,
            messages_from_backend=relay.backend.messages,
        )
        relay.client.out = relay.backend.out = b""
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(relay.handle._finished, result)


def _wire(side: _Side, data: bytes | bytearray | memoryview) -> bytes:
    """What to put on ``side``'s socket for plaintext ``data``: itself, or TLS records."""
    tls = side.tls
    if tls is None:
        return bytes(data)
    tls.ssl_object.write(data)
    return tls.outgoing.read()


def _who(side: _Side) -> str:
    return "client" if side.is_client else "backend"


@contextlib.asynccontextmanager
async def open_relay_engine(
    *, recv_buffer_size: int = RECV_BUFFER_SIZE
) -> AsyncIterator[RelayEngine]:
    """Run a :class:`RelayEngine` thread for the duration of the block.

    On exit every relay still running ends with reason ``terminated`` and the thread is
    joined (bounded).
    """
    engine = RelayEngine(recv_buffer_size=recv_buffer_size)
    engine._start(trio.lowlevel.current_trio_token())
    try:
        yield engine
    finally:
        await engine._stop()
