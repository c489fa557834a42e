"""The relay engine's epoll loop: everything that runs in the engine thread.

The common case runs in C (``_pump.Pump.run``, waypoint/proxy/relay/_pump.c): it waits,
and relays every readable socket (recv, count, skip headers, send; for a TLS client also
decrypt / encrypt its records on the session's own SSL) without the GIL until an event
needs Python. What it hands back is dispatched here: back-pressure, EOF and errors, reads
past the byte budget, relays with header hooks, client TLS when its record layer stays in
Python (client_tls.py) and commands from trio (bridge.py). What a read means (counts, the
budget, the decided end, the FATAL at a boundary, flush-then-finish, the verdict) is
decided by each relay's :class:`~waypoint.proxy.relay.core.RelayCore`; this module only
moves bytes and keeps epoll interest in step.

Isolation: every chunk handled here is a bytes object of its own (``sock.recv`` in
Python; the C loop's data reports carry copies out of its private buffer), so nothing one
relay does can change the bytes another relay is about to send.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import time
from typing import TYPE_CHECKING, Final

from waypoint.pgwire.boundary import HeaderCallback, ProtocolError

from .base import RelayReason
from .bridge import Command, Commands, RelayHandle, Reporter
from .client_tls import TlsEnd, TlsHandover, TlsRecords, records_for
from .core import RelayCore

if TYPE_CHECKING:
    from waypoint.audit.session import SessionAudit

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
#: Events taken per ``epoll_wait`` (the C loop's batch).
_MAX_EVENTS: Final = 256
#: How often a session waiting for the audit sink looks again, and how long records may
#: wait in the audit tap of a relay served in C before they are queued (the C loop returns
#: that long after it first fed a tap; an idle tap wakes nothing).
_AUDIT_POLL: Final = 0.02
#: Bytes of encoded records an audited relay served in C may hold before the engine
#: thread takes them (its tap's bound); a read past it is recorded by Python first.
_TAP_MAX: Final = 256 * 1024
_PEER_GONE_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN}
)


class Side(_pump.Lane):
    """One socket of a relay: what is read from it and what waits to be written to it.

    The C base (``_pump.Lane``) holds what the C loop needs: ``fd``, ``reading``,
    ``received``, the shared byte ``budget`` and the message-boundary tracker
    (``feed``, ``feed_until_boundary``, ``at_boundary``, ``messages``; the semantics of
    :class:`~waypoint.pgwire.boundary.BoundaryTracker`). It is the relay core's
    :class:`~waypoint.proxy.relay.core.Direction`.
    """

    __slots__ = ("is_client", "mask", "out", "peer", "recv", "relay", "send", "sock", "tls")

    def __init__(
        self,
        relay: Relay,
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
        #: Bytes for this socket not yet written (bounded by one recv, plus a FATAL).
        self.out: bytes = b""
        #: The epoll mask currently registered (0: not registered).
        self.mask = 0
        self.peer: Side = self  # set by Relay
        #: The client's TLS record layer when the client side speaks TLS (engine-thread only).
        self.tls: TlsRecords | None = None


class Relay:
    """One relay's sockets and its core. Mutated only by the engine thread once added,
    except the counters the trio side reads."""

    __slots__ = ("audit", "backend", "client", "core", "finished", "handle", "stopped", "tls")

    def __init__(
        self,
        client_sock: socket.socket,
        backend_sock: socket.socket,
        *,
        max_bytes: int,
        byte_limit_error: bytes,
        on_client_header: HeaderCallback | None,
        on_backend_header: HeaderCallback | None,
        client_tls: TlsHandover | None,
        c_tls: bool = True,
        audit: SessionAudit | None = None,
        stop_at_terminate: bool = False,
    ) -> None:
        #: The statement audit of this session (None: audit off; the C loop serves it).
        self.audit = audit
        self.client = client = Side(self, client_sock, True, on_client_header)
        self.backend = backend = Side(self, backend_sock, False, on_backend_header)
        client.link(backend)  # the client lane holds the shared budget
        client.peer = backend
        backend.peer = client
        self.core = RelayCore(
            client,
            backend,
            max_bytes=max_bytes,
            byte_limit_error=byte_limit_error,
            stop_at_terminate=stop_at_terminate,
        )
        client.stop_at_terminate = stop_at_terminate
        if client_tls is not None:
            # With statement audit the C loop's tap records the plaintext (see ``pumped``).
            client.tls = records_for(client, client_tls, c_tls=c_tls)
        #: The client's TLS record layer runs in Python: both sides are served off the C loop.
        self.tls = client.tls is not None and not client.tls.in_c
        self.handle: RelayHandle
        #: The decided end has been applied to the sockets (client no longer read).
        self.stopped = False
        #: Torn down (unregistered, verdict reported).
        self.finished = False

    @property
    def pumped(self) -> bool:
        """Served by the C loop: plain sockets or a TLS client whose record layer runs in C,
        no header hooks. An audited relay too: the C loop feeds what it reads (plaintext) to
        the session's C tracker (the relay's audit tap) before sending it, and its records
        are queued after each batch. With ``on_error = "close"``, while the sink refuses
        records (its gate, which the tracker holds) the C loop hands each client read to
        Python unsent (TAP), so that a sink known to fail ends the session before one more
        statement goes through."""
        return not (self.tls or self.client.hook is not None or self.backend.hook is not None)


def wire(side: Side, plaintext: bytes) -> bytes:
    """What to put on ``side``'s socket for ``plaintext``: itself, or TLS records."""
    return plaintext if side.tls is None else side.tls.encrypt(plaintext)


def _who(side: Side) -> str:
    return "client" if side.is_client else "backend"


class EpollLoop:
    """The engine thread's state and its loop (see the module docstring)."""

    def __init__(self, recv_buffer_size: int, commands: Commands, *, c_tls: bool = True) -> None:
        self._commands = commands
        self.epoll = select.epoll()
        self.epoll.register(commands.wake_fd, _EPOLLIN)
        #: Sides of plain relays (the C loop's, or hooked) and of relays with a TLS client.
        self._sides: dict[int, Side] = {}
        self._tls_sides: dict[int, Side] = {}
        self.relays: set[Relay] = set()
        self._timed: set[Relay] = set()
        #: Relays whose client is not read until the audit sink has room: since when.
        self._audit_waiting: dict[Relay, float] = {}
        #: Audited relays served in C: their taps are read after every batch.
        self._tapped: set[Relay] = set()
        #: Bytes per read (each read in Python gets a bytes object of its own).
        self._recv_size = recv_buffer_size
        #: Run client TLS record layers in C when the session allows it (client_tls.py).
        self.c_tls = c_tls
        #: The C loop over ``epoll``, with a receive buffer of its own.
        self.pump = _pump.Pump(self.epoll.fileno(), recv_buffer_size, _MAX_EVENTS)
        self._reporter: Reporter | None = None
        self.failure: str | None = None

    # -- the thread -----------------------------------------------------------------------

    def run(self, reporter: Reporter) -> None:
        """The engine thread's body: loop until told to stop, then end every relay."""
        self._reporter = reporter
        try:
            self._loop()
        except BaseException as exc:  # a bug: fail every relay loudly rather than hang them
            self.failure = f"relay engine failed: {type(exc).__name__}: {exc}"
            for relay in list(self.relays):
                self._finish(relay, "error", self.failure, force=True)
        finally:
            left = self._commands.close()
            for relay in list(self.relays):
                self._finish(relay, "terminated", "relay engine stopped")
            for kind, queued, _, _ in left:
                if kind == "add" and queued is not None:
                    self._finish(queued, "terminated", self.failure or "relay engine stopped")
            self.epoll.close()

    def _loop(self) -> None:
        run = self.pump.run
        sides = self._sides
        tls_sides = self._tls_sides
        timed = self._timed
        wake_fd = self._commands.wake_fd
        monotonic = time.monotonic
        readable = _EPOLLIN
        other_event = self._other_event
        read_plain = self._read_plain
        tls_event = self._tls_event
        while True:
            timeout = max(0.0, min(r.core.deadline for r in timed) - monotonic()) if timed else -1.0
            if self._audit_waiting:
                timeout = _AUDIT_POLL if timeout < 0 else min(timeout, _AUDIT_POLL)
            # Every tap is empty here (drained after the last batch): the C loop comes back
            # _AUDIT_POLL after it feeds one, not every _AUDIT_POLL.
            tap_wait = _AUDIT_POLL if self._tapped else -1.0
            for code, fd, events, _n, arg in run(timeout, tap_wait):
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
                    assert isinstance(arg, bytes)  # what the peer did not take (a copy)
                    self._hold(side, arg)
                elif code == _pump.EOF:
                    self._closed(side)
                elif code == _pump.PAST_END:
                    assert isinstance(arg, bytes)  # the chunk (a copy), counted, not fed
                    self._after_read(side, side.relay.core.read_counted(side, arg, monotonic()))
                elif code == _pump.PROTOCOL:
                    assert isinstance(arg, ProtocolError)
                    self._finish(side.relay, "error", f"{_who(side)}: {arg}")
                elif code == _pump.RECV_ERROR:
                    assert isinstance(arg, int)
                    self._socket_error(side, OSError(arg, os.strerror(arg)))
                elif code == _pump.SEND_ERROR:
                    assert isinstance(arg, int)
                    self._socket_error(side.peer, OSError(arg, os.strerror(arg)))
                elif code == _pump.TLS_OWN:
                    assert side.tls is not None
                    self._send_own(side, side.tls.own_records())
                elif code == _pump.TLS_END:
                    self._closed(side)
                elif code == _pump.TLS_ERROR:
                    assert isinstance(arg, str)
                    self._tls_failed(side if side.tls is not None else side.peer, arg)
                elif code == _pump.TAP:
                    assert isinstance(arg, bytes)  # counted and fed, not sent (a copy)
                    self._after_read(side, arg)
                elif code == _pump.TERMINATE:
                    assert isinstance(arg, bytes)  # counted and fed, not sent (a copy)
                    self._after_read(side, side.relay.core.client_terminate(arg))
            if timed:
                now = monotonic()
                for relay in [r for r in timed if r.core.expired(now)]:
                    self._finish(relay)
            if self._tapped:
                self._drain_taps()
            if self._audit_waiting:
                self._audit_resume()

    # -- commands from trio ----------------------------------------------------------------

    def _run_commands(self) -> bool:
        """Run what trio asked for; True when the engine must stop (relays added with
        or after the stop are ended with every other on the way out)."""
        stop = False
        for command in self._commands.take():
            if command[0] == "stop":
                stop = True
            else:
                self._run_command(command)
        return stop

    def _run_command(self, command: Command) -> None:
        kind, relay, fatal, timeout = command
        assert relay is not None
        if kind == "add":
            self._add(relay)
        elif relay.finished or relay not in self.relays:
            pass
        elif kind == "terminate":
            assert fatal is not None
            if relay.core.terminate(fatal, "terminated", timeout, time.monotonic()):
                self._begin_end(relay)
        elif kind == "abort":
            self._finish(relay, "terminated", "relay aborted")

    def _add(self, relay: Relay) -> None:
        for side in (relay.client, relay.backend):
            if side.fd in self._sides or side.fd in self._tls_sides:
                self._finish(relay, "error", f"file descriptor {side.fd} is already being relayed")
                return
        if relay.core.done:  # the handshake's leftovers were malformed
            self._finish(relay)
            return
        self.relays.add(relay)
        table = self._tls_sides if relay.tls else self._sides
        for side in (relay.client, relay.backend):
            table[side.fd] = side
        if relay.pumped:
            if relay.audit is not None:
                relay.client.tap_enable(relay.audit.tracker, _TAP_MAX)
                self._tapped.add(relay)
            self.pump.add(relay.client)
            self.pump.add(relay.backend)
        for side in (relay.client, relay.backend):
            try:
                self._update(side)
            except OSError as exc:
                self._finish(relay, "error", f"cannot watch {_who(side)} socket: {exc}")
                return
        if relay.core.terminating:  # the handshake's leftovers alone exceed max_bytes
            self._begin_end(relay)
            return
        # Bytes handed over by the handshake: try to write them now.
        for side in (relay.client, relay.backend):
            if side.out and not relay.finished:
                self._flush(side)
        client = relay.client
        if client.tls is not None and client.reading and not relay.finished:
            self._tls_read(client, False)  # ciphertext the client pipelined after its handshake

    # -- reads ---------------------------------------------------------------------------

    def _recv(self, side: Side) -> bytes | None:
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
            self._closed(side)
            return None
        return data

    def _read_plain(self, side: Side) -> None:
        """Read ``side`` once and pass the chunk on (the C loop's work, in Python: for
        relays with header hooks or a TLS client, and reads that follow another event)."""
        if side.tls is not None:
            self._tls_read(side, True)  # the audit's hold is checked there
            return
        if side.is_client and side.relay.audit is not None and self._audit_hold(side):
            return
        chunk = self._recv(side)
        if chunk is not None:
            self._after_read(side, side.relay.core.read(side, chunk, time.monotonic()))

    def _after_read(self, side: Side, data: bytes) -> None:
        """Act on the core's answer to a read from ``side``: ``data`` goes to the peer."""
        relay = side.relay
        core = relay.core
        if core.done:
            self._finish(relay)
            return
        if not core.terminating:
            if data:
                audit = relay.audit
                if audit is not None and not self._audit(audit, side, data):
                    return
                self._forward(side, data)
            if core.terminate_held and side.is_client and not relay.finished:
                # The client's Terminate, held back: the session is over (the client may
                # wait for the end of the stream before it closes).
                self._closed(side)
            return
        self._stop_for_end(relay)
        client = relay.client
        if data and not self._queue(client, data):  # backend bytes up to the boundary
            return
        if core.fatal_due:
            self._queue_fatal(relay)
        elif data:
            # No boundary yet (a long message): forward it, keep going until the deadline.
            side.reading = False
            self._update(side)
            self._flush(client)

    def _forward(self, side: Side, data: bytes) -> None:
        """Send ``data`` read from ``side`` to its peer; hold what it does not take."""
        peer = side.peer
        if peer.tls is not None:
            try:
                data = peer.tls.encrypt(data)
            except ssl.SSLError as exc:
                self._tls_error(peer, exc)
                return
        try:
            sent = peer.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._socket_error(peer, exc)
            return
        if sent != len(data):
            self._hold(side, data[sent:])

    def _hold(self, side: Side, rest: bytes) -> None:
        """Back-pressure: keep what the peer did not take, stop reading until it drains."""
        peer = side.peer
        peer.out = rest
        side.reading = False
        self._update(side)
        self._update(peer)

    def _other_event(self, side: Side, events: int) -> bool:
        """Anything but plain readability (writable, HUP, ERR, several at once). Flushes
        what is pending toward ``side``; True when ``side`` should be read now."""
        if side.relay.finished:
            return False
        if events & _EPOLLOUT or (events & _EPOLLBAD and side.out):
            self._flush(side)
            if side.relay.finished:
                return False
        return side.reading and bool(events & (_EPOLLIN | _EPOLLBAD))

    # -- client TLS (off the plaintext hot path) -------------------------------------------

    def _tls_event(self, side: Side, events: int) -> None:
        if self._other_event(side, events):
            self._read_plain(side)  # the client's ciphertext, or the backend's plaintext

    def _tls_read(self, side: Side, receive: bool) -> None:
        """Ciphertext from the TLS client: receive it (if ``receive``), then decrypt and
        pass on everything that is complete, until back-pressure or the relay ends."""
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
            try:
                tls.take(ciphertext)
            except ssl.SSLError as exc:
                self._tls_error(side, exc)
                return
        size = self._recv_size
        core = relay.core
        while side.reading and not relay.finished:
            if relay.audit is not None and self._audit_hold(side):
                break
            try:
                data = tls.decrypt(size)
            except TlsEnd:
                self._closed(side)
                return
            except ssl.SSLError as exc:
                self._tls_error(side, exc)
                return
            if data is None:
                break
            self._after_read(side, core.read(side, data, time.monotonic()))
        if not relay.finished and (records := tls.own_records()):
            self._send_own(side, records)

    def _send_own(self, side: Side, records: bytes) -> None:
        """Records the client's TLS session wrote by itself (a key update answer, an
        alert): they go to the client before anything more from the backend."""
        if side.relay.finished or not records:
            return
        side.out += records
        backend = side.peer
        if backend.reading:  # resumed by _flush once the client took everything
            backend.reading = False
            self._update(backend)
        self._flush(side)

    # -- statement audit ----------------------------------------------------------------

    def _audit(self, audit: SessionAudit, side: Side, data: bytes) -> bool:
        """Record ``data`` (read from ``side``) before it is forwarded; False when it must
        not be (the session is being ended for the audit, or the tracker failed)."""
        now = time.monotonic()
        try:
            # What the C loop fed the tracker before is queued first (one tracker, in order).
            if not side.is_client:
                audit.backend(data, now)
                return True
            if audit.client(data, now):
                return True
        except Exception as exc:  # a bug in the tracker: never relay unrecorded
            self._finish(
                side.relay, "error", f"statement audit failed: {type(exc).__name__}: {exc}"
            )
            return False
        self._audit_close(side.relay)
        return False

    def _audit_hold(self, side: Side) -> bool:
        """Before reading the client: True when it must not be read now (the sink is
        full: the session waits; or it ends, with ``on_error = "close"``)."""
        relay = side.relay
        audit = relay.audit
        assert audit is not None
        if audit.must_close:
            audit.close()
            self._audit_close(relay)
            return True
        if not audit.must_wait:
            return False
        side.reading = False
        self._update(side)
        self._audit_waiting.setdefault(relay, time.monotonic())
        return True

    def _drain_tap(self, relay: Relay) -> None:
        """Queue the records of what the C loop relayed for ``relay`` (its tracker was fed
        each read before it was sent)."""
        audit = relay.audit
        assert audit is not None
        audit.drain()

    def _drain_taps(self) -> None:
        """After each batch: record every tap, then (the sink may have filled meanwhile)
        park the client of every audited relay while the sink is full (``block``) or end
        the session (``close``), before the C loop reads again."""
        for relay in list(self._tapped):
            if relay.finished:
                self._tapped.discard(relay)
            elif relay.client.tap_used:
                try:
                    self._drain_tap(relay)
                except Exception as exc:  # a bug in the tracker: end the relay
                    self._finish(
                        relay, "error", f"statement audit failed: {type(exc).__name__}: {exc}"
                    )
        for relay in list(self._tapped):
            audit = relay.audit
            assert audit is not None
            if audit.must_close:
                audit.close()
                self._audit_close(relay)
            elif audit.must_wait and relay not in self._audit_waiting and relay.client.reading:
                client = relay.client
                client.reading = False
                self._update(client)
                self._audit_waiting[relay] = time.monotonic()

    def _audit_close(self, relay: Relay) -> None:
        audit = relay.audit
        assert audit is not None
        if relay.core.terminate(audit.fatal, "terminated", 2.0, time.monotonic()):
            self._begin_end(relay)

    def _audit_resume(self) -> None:
        """Sessions waiting for the sink read again once it has room."""
        now = time.monotonic()
        for relay, since in list(self._audit_waiting.items()):
            audit = relay.audit
            assert audit is not None
            if relay.finished or relay.stopped:
                del self._audit_waiting[relay]
                continue
            if audit.must_wait:
                continue
            del self._audit_waiting[relay]
            audit.blocked(now - since)
            client = relay.client
            if relay.backend.out:
                continue  # back-pressure: the flush resumes reading
            client.reading = True
            self._update(client)
            if client.tls is not None:
                self._tls_read(client, False)

    def _tls_error(self, side: Side, exc: ssl.SSLError) -> None:
        self._tls_failed(side, exc.reason or type(exc).__name__)

    def _tls_failed(self, side: Side, reason: str) -> None:
        side.relay.core.closed(side, time.monotonic(), f"client TLS: {reason}", gone=False)
        self._closing(side.relay, side)

    # -- writes ----------------------------------------------------------------------------

    def _queue(self, side: Side, plaintext: bytes) -> bool:
        """Append ``plaintext`` to what goes to ``side``; False if TLS failed (handled)."""
        try:
            side.out += wire(side, plaintext)
        except ssl.SSLError as exc:
            self._tls_error(side, exc)
            return False
        return True

    def _update(self, side: Side) -> None:
        """Register the interest ``side`` needs now. A side that neither reads nor writes
        is unregistered, so that level-triggered HUP/ERR cannot spin the loop."""
        mask = (_EPOLLIN if side.reading else 0) | (_EPOLLOUT if side.out else 0)
        old = side.mask
        if mask == old:
            return
        if mask == 0:
            self.epoll.unregister(side.fd)
        elif old == 0:
            self.epoll.register(side.fd, mask)
        else:
            self.epoll.modify(side.fd, mask)
        side.mask = mask

    def _flush(self, side: Side) -> None:
        """Write what is pending toward ``side``; resume reading its peer when drained."""
        relay = side.relay
        core = relay.core
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
        if side.is_client:
            core.client_drained()
        if core.closing:
            # Done once nothing is left to write.
            if not relay.client.out and not relay.backend.out:
                self._finish(relay)
            else:
                self._update(side)
            return
        peer = side.peer
        if not (core.terminating and peer.is_client) and not (
            peer.is_client and relay in self._audit_waiting
        ):
            peer.reading = True
        self._update(side)
        self._update(peer)
        if peer.tls is not None and peer.reading:
            # Decrypted or undecrypted input may wait inside the TLS objects, where
            # epoll cannot see it.
            self._tls_read(peer, False)

    # -- the end ---------------------------------------------------------------------------

    def _begin_end(self, relay: Relay) -> None:
        """The core decided an end (terminate, or the byte limit): apply it."""
        self._stop_for_end(relay)
        if relay.core.fatal_due:
            self._queue_fatal(relay)

    def _stop_for_end(self, relay: Relay) -> None:
        """Once per relay: nothing more goes to the backend, the deadline is watched."""
        if relay.stopped:
            return
        relay.stopped = True
        self._timed.add(relay)
        client, backend = relay.client, relay.backend
        client.reading = False
        backend.out = b""
        self._update(backend)
        self._update(client)

    def _queue_fatal(self, relay: Relay) -> None:
        """Everything read from the backend ends at a boundary: the FATAL goes next."""
        fatal = relay.core.take_fatal(time.monotonic())
        self._timed.add(relay)
        client, backend = relay.client, relay.backend
        if not self._queue(client, fatal):
            return
        backend.reading = False
        self._update(backend)
        self._flush(client)

    def _closed(self, side: Side) -> None:
        """EOF from ``side``."""
        side.relay.core.closed(side, time.monotonic())
        self._closing(side.relay, side)

    def _socket_error(self, side: Side, exc: OSError) -> None:
        gone = exc.errno in _PEER_GONE_ERRNOS
        side.relay.core.closed(side, time.monotonic(), f"{_who(side)} socket: {exc}", gone=gone)
        self._closing(side.relay, side)

    def _closing(self, relay: Relay, gone: Side) -> None:
        """``gone`` closed or failed: stop reading, flush what the other side is owed
        (bounded by the core's deadline), then finish."""
        gone.out = b""
        other = gone.peer
        relay.client.reading = relay.backend.reading = False
        if not other.out:
            self._finish(relay)
            return
        self._timed.add(relay)
        self._update(gone)
        self._update(other)
        self._flush(other)

    def _finish(
        self,
        relay: Relay,
        reason: RelayReason | None = None,
        error: str | None = None,
        *,
        force: bool = False,
    ) -> None:
        """Tear the relay down and report the core's verdict (``reason`` / ``error``
        count only if no cause was recorded before, unless ``force``)."""
        if relay.finished:
            return
        relay.finished = True
        if relay in self._tapped:
            self._tapped.discard(relay)
            if relay.client.tap_used:
                with contextlib.suppress(Exception):  # the verdict goes out whatever happens
                    self._drain_tap(relay)
        result = relay.core.end(reason, error, force=force)
        for side in (relay.client, relay.backend):
            side.reading = False
            self.pump.discard(side)
            table = self._tls_sides if relay.tls else self._sides
            if table.get(side.fd) is side:
                del table[side.fd]
            if side.mask:
                with contextlib.suppress(OSError, ValueError):
                    self.epoll.unregister(side.fd)
                side.mask = 0
        self.relays.discard(relay)
        self._timed.discard(relay)
        self._audit_waiting.pop(relay, None)
        relay.client.out = relay.backend.out = b""
        if self._reporter is not None:
            self._reporter.report(relay.handle, result)
