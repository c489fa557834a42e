"""The relay engine's C hot path (waypoint/proxy/relay/_pump.c), without the engine.

The tracker half is checked against the sans-IO reference
(:class:`waypoint.pgwire.boundary.BoundaryTracker`) on random streams cut at random
places; the pump half over real socket pairs, one report code at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import math
import os
import select
import socket
import ssl
import struct
from collections.abc import Callable, Iterator

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from waypoint.pgwire.boundary import BoundaryTracker, ProtocolError
from waypoint.proxy.relay import _pump
from waypoint.proxy.relay._pump import Lane, Pump
from waypoint.proxy.relay.client_tls import c_tls_available


def message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


# -- the tracker: same answers as BoundaryTracker ----------------------------------------

_bodies = st.binary(max_size=40)
_messages = st.lists(
    st.tuples(st.one_of(st.sampled_from(b"QSFZXE"), st.integers(0, 255)), _bodies).map(
        lambda tb: message(bytes([tb[0]]), tb[1])
    ),
    max_size=12,
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[last:p])
        last = p
    return chunks


def _state(t: BoundaryTracker) -> tuple[int, ...]:
    where = (t.last_type, t.prev_type, t.last_byte, t.readies, t.syncs)
    return (t.messages, t.at_boundary, t._skip, len(t._header), *where)


def _lane_state(lane: Lane) -> tuple[int, ...]:
    where = (lane.last_type, lane.prev_type, lane.last_byte, lane.readies, lane.syncs)
    return (lane.messages, lane.at_boundary, lane.skip, lane.partial_header, *where)


@pytest.fixture
def fd() -> Iterator[int]:
    a, b = socket.socketpair()
    yield a.fileno()
    a.close()
    b.close()


@given(
    stream=_messages,
    garbage=st.binary(max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_lane_feed_matches_boundary_tracker(
    stream: list[bytes], garbage: bytes, cuts: list[int]
) -> None:
    data = b"".join(stream) + garbage
    ref = BoundaryTracker()
    lane = Lane(0)
    for chunk in _split(data, cuts):
        ref_error = lane_error = None
        try:
            ref.feed(chunk)
        except ProtocolError as exc:
            ref_error = str(exc)
        try:
            lane.feed(chunk)
        except ProtocolError as exc:
            lane_error = str(exc)
        assert lane_error == ref_error
        if ref_error is not None:
            assert lane.messages == ref.messages
            return
        assert _lane_state(lane) == _state(ref)


@given(
    stream=_messages,
    cuts=st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
    stop=st.integers(0, 10_000),
)
def test_lane_feed_until_boundary_matches_boundary_tracker(
    stream: list[bytes], cuts: list[int], stop: int
) -> None:
    data = b"".join(stream)
    chunks = _split(data, cuts)
    k = stop % len(chunks)
    ref, lane = BoundaryTracker(), Lane(0)
    for chunk in chunks[:k]:
        ref.feed(chunk)
        lane.feed(chunk)
    for chunk in chunks[k:]:
        assert lane.feed_until_boundary(chunk) == ref.feed_until_boundary(chunk)
        assert _lane_state(lane) == _state(ref)


@given(stream=_messages, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_lane_hook_sees_the_headers_boundary_tracker_sees(
    stream: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(stream)
    seen_ref: list[tuple[int, int]] = []
    seen_lane: list[tuple[int, int]] = []
    ref = BoundaryTracker(on_header=lambda t, n: seen_ref.append((t, n)))
    lane = Lane(0)
    lane.hook = lambda t, n: seen_lane.append((t, n))
    for chunk in _split(data, cuts):
        ref.feed(chunk)
        lane.feed(chunk)
    assert seen_lane == seen_ref
    assert lane.messages == ref.messages == len(stream)


def test_lane_reports_the_same_error_text_as_the_reference() -> None:
    lane = Lane(0)
    with pytest.raises(ProtocolError, match=r"invalid message length 3 for message type 'Q'"):
        lane.feed(b"Q\x00\x00\x00\x03")
    lane = Lane(0)
    lane.feed(b"\x00\xff")  # a header split across chunks
    with pytest.raises(ProtocolError, match=r"length -1 for message type '0x00'"):
        lane.feed(b"\xff\xff\xff")


def test_a_hook_that_raises_stops_the_feed() -> None:
    lane = Lane(0)

    def hook(t: int, n: int) -> None:
        raise RuntimeError("hook failed")

    lane.hook = hook
    with pytest.raises(RuntimeError, match="hook failed"):
        lane.feed(message(b"Q", b"x"))


@pytest.mark.parametrize("replace_at", [0, 1, 2])
def test_a_hook_that_replaces_itself_is_held_while_it_runs(replace_at: int) -> None:
    """A hook may set ``lane.hook`` to another callable from inside its call, which drops
    the lane's reference to it. The lane must keep the running hook alive (under
    AddressSanitizer with PYTHONMALLOC=malloc, touching it afterwards is a use-after-free)
    and answer as BoundaryTracker does."""
    stream = message(b"Q", b"select 1\x00") + message(b"P", b"") + message(b"B", b"xy") * 3
    cuts = [2, 12, len(stream) - 3]  # the second chunk completes a split header

    def run(target: Lane | BoundaryTracker) -> list[tuple[str, int, int]]:
        seen: list[tuple[str, int, int]] = []
        calls = [0]

        def make(tag: str) -> Callable[[int, int], None]:
            def hook(t: int, n: int) -> None:
                seen.append((tag, t, n))
                calls[0] += 1
                if calls[0] == replace_at + 1:
                    # The only reference to this hook was the lane's: now it is ours alone.
                    new = make(tag + "'")
                    if isinstance(target, Lane):
                        target.hook = new
                    else:
                        target.on_header = new

            return hook

        if isinstance(target, Lane):
            target.hook = make("h")
        else:
            target.on_header = make("h")
        for chunk in _split(stream, cuts):
            target.feed(chunk)
        return seen

    ref, lane = BoundaryTracker(), Lane(0)
    assert run(lane) == run(ref)
    assert lane.messages == ref.messages == 5


def test_a_hook_that_replaces_itself_is_held_in_feed_until_boundary() -> None:
    lane = Lane(0)
    seen: list[int] = []

    def first(t: int, n: int) -> None:
        seen.append(t)
        lane.hook = lambda t, n: seen.append(-t)

    lane.hook = first
    del first
    lane.feed(b"Q\x00")  # a split header
    assert lane.feed_until_boundary(b"\x00\x00\x05x" + message(b"Z", b"I")) == 4
    assert seen == [ord("Q")]


def test_huge_lengths_do_not_overflow() -> None:
    lane = Lane(0)
    lane.feed(b"D\x7f\xff\xff\xff" + bytes(10))
    assert lane.skip == 0x7FFFFFFF - 4 - 10
    assert not lane.at_boundary


# -- the Lane API -----------------------------------------------------------------------


def test_lane_api_rejects_misuse(fd: int) -> None:
    with pytest.raises(ValueError):
        Lane(-1)
    a, b, c = Lane(fd), Lane(fd), Lane(fd)
    with pytest.raises(ValueError, match="own peer"):
        a.link(a)
    with pytest.raises(TypeError):
        a.link(object())  # type: ignore[arg-type]
    a.link(b)
    assert a.linked and b.linked and not c.linked
    with pytest.raises(ValueError, match="already linked"):
        a.link(c)
    with pytest.raises(ValueError, match="already linked"):
        c.link(b)
    with pytest.raises(TypeError, match="callable"):
        c.hook = 42  # type: ignore[assignment]


def test_linked_lanes_share_one_budget(fd: int) -> None:
    a, b = Lane(fd), Lane(fd)
    a.link(b)
    a.budget = 100
    assert b.budget == 100
    b.budget -= 30
    assert a.budget == 70


def test_lanes_in_a_reference_cycle_are_collected(fd: int) -> None:
    freed: list[str] = []

    class Side(Lane):
        __slots__ = ("other", "tag")

        def __del__(self) -> None:
            freed.append(self.tag)

    a, b = Side(fd), Side(fd)
    a.tag, b.tag = "a", "b"
    a.link(b)
    a.other, b.other = b, a
    del a, b
    gc.collect()
    assert sorted(freed) == ["a", "b"]


# -- the pump over real sockets -------------------------------------------------------------


class Rig:
    """client_app <-> [client lane | pump | backend lane] <-> backend_app, over socket pairs."""

    def __init__(self, bufsize: int = 4096, backend_type: int = socket.SOCK_STREAM) -> None:
        self.client_app, client_proxy = socket.socketpair()
        backend_proxy, self.backend_app = socket.socketpair(type=backend_type)
        self.socks = [self.client_app, client_proxy, backend_proxy, self.backend_app]
        for s in (client_proxy, backend_proxy):
            s.setblocking(False)
        self.epoll = select.epoll()
        self.pump = Pump(self.epoll.fileno(), bufsize, 16)
        self.client = Lane(client_proxy.fileno())
        self.backend = Lane(backend_proxy.fileno())
        self.client.link(self.backend)
        self.client.budget = 1 << 62
        for lane in (self.client, self.backend):
            self.epoll.register(lane.fd, select.EPOLLIN)
            self.pump.add(lane)
        self.client_proxy, self.backend_proxy = client_proxy, backend_proxy

    def close(self) -> None:
        self.pump.discard(self.client)
        self.pump.discard(self.backend)
        self.epoll.close()
        for s in self.socks:
            s.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_pump_relays_both_ways_and_counts(rig: Rig) -> None:
    q = message(b"Q", b"select 1\x00")
    rig.client_app.sendall(q)
    assert rig.pump.run(0.05) == []  # relayed in C: nothing for Python
    assert rig.backend_app.recv(100) == q
    reply = message(b"T", bytes(20)) + message(b"Z", b"I")
    rig.backend_app.sendall(reply)
    rig.pump.run(0.2)
    assert rig.client_app.recv(100) == reply
    assert (rig.client.received, rig.backend.received) == (len(q), len(reply))
    assert (rig.client.messages, rig.backend.messages) == (1, 2)
    assert rig.client.budget == (1 << 62) - len(q) - len(reply)


def test_a_lane_that_stops_at_terminate_hands_that_read_back_unsent(rig: Rig) -> None:
    """The pool's relays: the read holding the client's Terminate goes to Python (counted
    and fed, not sent); reads without one stay in C; the backend lane tracks its last
    ReadyForQuery."""
    rig.client.stop_at_terminate = True
    q = message(b"Q", b"select 1\x00")
    rig.client_app.sendall(q)
    assert rig.pump.run(0.05) == []  # no Terminate: relayed in C
    assert rig.backend_app.recv(100) == q
    rig.backend_app.sendall(message(b"C", b"SELECT 1\x00") + message(b"Z", b"I"))
    rig.pump.run(0.2)
    assert (rig.backend.last_type, rig.backend.last_byte, rig.backend.readies) == (
        ord("Z"),
        ord("I"),
        1,
    )
    rig.client_app.sendall(message(b"S", b"") + message(b"X", b""))
    [(code, fd, _, n, chunk)] = rig.pump.run(1.0)
    assert (code, fd, n) == (_pump.TERMINATE, rig.client.fd, 10)
    assert chunk == message(b"S", b"") + message(b"X", b"") and type(chunk) is bytes
    assert (rig.client.last_type, rig.client.prev_type, rig.client.syncs) == (ord("X"), ord("S"), 2)
    assert rig.client.received == len(q) + 10
    rig.backend_proxy.setblocking(False)
    with pytest.raises(BlockingIOError):
        rig.backend_app.recv(100, socket.MSG_DONTWAIT)  # nothing was sent on


def test_a_lane_that_does_not_stop_passes_the_terminate_on(rig: Rig) -> None:
    rig.client_app.sendall(message(b"X", b""))
    assert rig.pump.run(0.05) == []
    assert rig.backend_app.recv(100) == message(b"X", b"")


def test_pump_returns_empty_after_the_timeout(rig: Rig) -> None:
    assert rig.pump.run(0.0) == []
    assert rig.pump.run(0.01) == []


@pytest.mark.parametrize("timeout", [1e7, 3e9, math.inf])
def test_pump_takes_a_long_timeout(rig: Rig, timeout: float) -> None:
    """A timeout beyond what epoll_wait takes in one call (int milliseconds) is waited in
    slices; converting it whole overflows an int (undefined behaviour: the sanitizer
    run catches it)."""
    rig.client_app.shutdown(socket.SHUT_WR)
    assert rig.pump.run(timeout) == [(_pump.EOF, rig.client.fd, select.EPOLLIN, 0, 0)]


def test_pump_reports_eof(rig: Rig) -> None:
    rig.client_app.shutdown(socket.SHUT_WR)
    assert rig.pump.run(1.0) == [(_pump.EOF, rig.client.fd, select.EPOLLIN, 0, 0)]


def test_pump_reports_an_event_for_an_fd_it_does_not_serve(rig: Rig) -> None:
    other_a, other_b = socket.socketpair()
    try:
        rig.epoll.register(other_a.fileno(), select.EPOLLIN)
        other_b.send(b"x")
        assert rig.pump.run(1.0) == [(_pump.EVENT, other_a.fileno(), select.EPOLLIN, 0, 0)]
    finally:
        other_a.close()
        other_b.close()


def test_pump_reports_other_events_of_served_lanes(rig: Rig) -> None:
    rig.epoll.modify(rig.client.fd, select.EPOLLIN | select.EPOLLOUT)
    [(code, fd, events, _, _)] = rig.pump.run(1.0)
    assert (code, fd) == (_pump.EVENT, rig.client.fd)
    assert events & select.EPOLLOUT


def test_pump_skips_a_lane_that_is_not_reading(rig: Rig) -> None:
    rig.client.reading = False
    rig.client_app.sendall(message(b"Q", b"x\x00"))
    assert rig.pump.run(0.05) == []
    assert rig.client.received == 0


def test_pump_hands_back_a_read_past_the_budget(rig: Rig) -> None:
    rig.client.budget = 5
    q = message(b"Q", b"select 1\x00")
    rig.client_app.sendall(q)
    [(code, fd, _, n, chunk)] = rig.pump.run(1.0)
    assert (code, fd, n) == (_pump.PAST_END, rig.client.fd, len(q))
    assert chunk == q and type(chunk) is bytes  # a copy: the report owns its bytes
    assert rig.client.received == len(q)
    assert rig.client.budget == 5 - len(q)
    assert rig.client.messages == 0  # not fed: Python decides what to forward


def test_pump_hands_back_a_protocol_error(rig: Rig) -> None:
    rig.backend_app.sendall(b"Z\x00\x00\x00\x02")
    [(code, fd, _, n, exc)] = rig.pump.run(1.0)
    assert (code, fd, n) == (_pump.PROTOCOL, rig.backend.fd, 5)
    assert isinstance(exc, ProtocolError)
    assert "invalid message length 2 for message type 'Z'" in str(exc)


def test_pump_hands_back_the_rest_of_a_partial_send(rig: Rig) -> None:
    rig.backend_proxy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rig.backend_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = bytes(1000)
    sent_total = 0
    while True:
        rig.client_app.sendall(message(b"d", body))
        sent_total += 1005
        reports = rig.pump.run(0.05)  # relayed in C until the peer stops taking bytes
        if reports:
            break
    [(code, fd, _, n, rest)] = reports
    assert (code, fd) == (_pump.PARTIAL, rig.client.fd)
    assert type(rest) is bytes and 0 < len(rest) <= n  # a copy: the report owns its bytes
    # What the backend got plus the rest is, byte for byte, what the client sent.
    got = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := rig.backend_app.recv(1 << 20, socket.MSG_DONTWAIT):
            got += chunk
    assert len(got) + len(rest) == sent_total
    assert bytes(got) + rest == message(b"d", body) * (sent_total // 1005)


def test_pump_reports_a_send_error(rig: Rig) -> None:
    rig.epoll.unregister(rig.backend.fd)  # only the client side is watched
    rig.backend_app.close()
    rig.socks.remove(rig.backend_app)
    rig.client_app.sendall(message(b"Q", b"x\x00"))
    [(code, fd, _, n, arg)] = rig.pump.run(1.0)
    assert (code, fd, n) == (_pump.SEND_ERROR, rig.client.fd, 7)
    assert arg in (errno.EPIPE, errno.ECONNRESET)


def test_pump_table_rules(rig: Rig, fd: int) -> None:
    assert len(rig.pump) == 2
    assert rig.client.in_pump
    with pytest.raises(ValueError, match="already"):
        rig.pump.add(rig.client)
    lone = Lane(fd)
    with pytest.raises(ValueError, match="linked"):
        rig.pump.add(lone)
    hooked, peer = Lane(fd), Lane(fd)
    hooked.link(peer)
    hooked.hook = lambda t, n: None
    with pytest.raises(ValueError, match="hook"):
        rig.pump.add(hooked)
    with pytest.raises(RuntimeError, match="hook"):
        rig.client.hook = lambda t, n: None
    twin, twin_peer = Lane(rig.client.fd), Lane(fd)
    twin.link(twin_peer)
    with pytest.raises(ValueError, match="already pumped"):
        rig.pump.add(twin)
    rig.pump.discard(rig.client)
    rig.pump.discard(rig.client)  # idempotent
    assert len(rig.pump) == 1 and not rig.client.in_pump
    rig.pump.discard(twin)  # not in the table: nothing happens
    assert len(rig.pump) == 1


def test_pump_grows_its_table_for_high_fds(rig: Rig) -> None:
    extra = [socket.socket() for _ in range(200)]
    try:
        a, b = socket.socketpair()
        extra += [a, b]
        la, lb = Lane(a.fileno()), Lane(b.fileno())
        la.link(lb)
        rig.pump.add(la)
        rig.pump.add(lb)
        assert len(rig.pump) == 4
        rig.pump.discard(la)
        rig.pump.discard(lb)
    finally:
        for s in extra:
            s.close()


def test_pump_rejects_a_bad_buffer_size() -> None:
    ep = select.epoll()
    try:
        with pytest.raises(TypeError):
            Pump(ep.fileno(), bytearray(10))  # type: ignore[arg-type]  # no shared buffers
        for size in (0, -1, 1 << 31):
            with pytest.raises(ValueError, match="buffer_size"):
                Pump(ep.fileno(), size)
    finally:
        ep.close()


# -- client TLS in the pump ------------------------------------------------------------------
#
# The client lane takes over the SSL* of a server-side ssl.SSLObject whose handshake Python
# completed (Lane.tls_attach); the pump then decrypts what the client sends and encrypts
# what the backend sends, without Python. The test's client is an ssl.SSLObject too, driven
# by hand over its own memory BIOs, so that every record is under the test's control.

_TLS_CA = trustme.CA()
_TLS_CERT = _TLS_CA.issue_cert("pump.test")


@pytest.fixture(autouse=True, scope="module")
def _bound() -> None:
    """OpenSSL's functions, as Python's _ssl resolves them, given to the pump."""
    assert c_tls_available()


class TlsPeer:
    """One end of a TLS session over memory BIOs."""

    def __init__(self, ctx: ssl.SSLContext, server: bool) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=server,
            server_hostname=None if server else "pump.test",
        )


def _tls_contexts(
    max_version: ssl.TLSVersion | None = None,
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _TLS_CERT.configure_cert(server)
    client = ssl.create_default_context()
    _TLS_CA.configure_trust(client)
    if max_version is not None:
        client.maximum_version = max_version
    return server, client


def _handshake(server: TlsPeer, client: TlsPeer) -> None:
    """Both handshakes, in memory; the server's post-handshake records reach the client."""
    done = [False, False]
    for _ in range(20):
        for i, (me, other) in enumerate(((client, server), (server, client))):
            if not done[i]:
                try:
                    me.obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            if me.outgoing.pending:
                other.incoming.write(me.outgoing.read())
        if all(done):
            break
    assert all(done)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.obj.read(1)  # takes session tickets, if any
    assert server.outgoing.pending == 0


class TlsRig(Rig):
    """A Rig whose client speaks TLS; the client lane runs the record layer in C."""

    def __init__(
        self,
        bufsize: int = 4096,
        max_version: ssl.TLSVersion | None = None,
        backend_type: int = socket.SOCK_STREAM,
    ) -> None:
        super().__init__(bufsize, backend_type)
        server_ctx, client_ctx = _tls_contexts(max_version)
        self.server = TlsPeer(server_ctx, True)
        self.tls = TlsPeer(client_ctx, False)
        _handshake(self.server, self.tls)
        self.pump.discard(self.client)
        assert self.client.tls_attach(self.server.obj, self.server.incoming, self.server.outgoing)
        assert self.client.tls_in_c
        self.pump.add(self.client)

    def send(self, plaintext: bytes) -> None:
        """The TLS client writes ``plaintext``; its records go on the wire."""
        self.tls.obj.write(plaintext)
        self.client_app.sendall(self.tls.outgoing.read())

    def receive(self, ciphertext: bytes = b"") -> bytes:
        """Everything the client can decrypt of what reached it (plus ``ciphertext``)."""
        with contextlib.suppress(BlockingIOError):
            while chunk := self.client_app.recv(1 << 20, socket.MSG_DONTWAIT):
                ciphertext += chunk
        self.tls.incoming.write(ciphertext)
        out = bytearray()
        with contextlib.suppress(ssl.SSLWantReadError):
            while data := self.tls.obj.read(1 << 20):
                out += data
        if self.tls.outgoing.pending:  # the client's own answers (a key update)
            self.client_app.sendall(self.tls.outgoing.read())
        return bytes(out)


@pytest.fixture
def tls_rig() -> Iterator[TlsRig]:
    r = TlsRig()
    yield r
    r.close()


def test_pump_decrypts_and_encrypts_a_tls_client_in_c(tls_rig: TlsRig) -> None:
    rig = tls_rig
    q = message(b"Q", b"select 1\x00") * 3
    rig.send(q)
    assert rig.pump.run(0.1) == []  # decrypted, counted and sent in C: nothing for Python
    assert rig.backend_app.recv(1000) == q
    reply = message(b"D", os.urandom(30_000)) + message(b"Z", b"I")
    rig.backend_app.sendall(reply)
    got = b""
    for _ in range(50):
        assert rig.pump.run(0.05) == []
        got += rig.receive()
        if len(got) >= len(reply):
            break
    assert got == reply
    # Counts, budget and message boundaries are in plaintext.
    assert (rig.client.received, rig.backend.received) == (len(q), len(reply))
    assert (rig.client.messages, rig.backend.messages) == (3, 2)
    assert rig.client.budget == (1 << 62) - len(q) - len(reply)


@pytest.mark.parametrize(("size", "count"), [(100, 5), (3000, 3)])
def test_tls_records_read_together_are_passed_on_together(size: int, count: int) -> None:
    """The records one read brings are decrypted back to back and sent on at once, not one
    send per record: the backend socket here is a SOCK_SEQPACKET pair, so each send arrives
    as a packet of its own."""
    rig = TlsRig(bufsize=16384, backend_type=socket.SOCK_SEQPACKET)
    try:
        plaintext = b""
        records = b""
        for i in range(count):
            m = message(b"d", bytes([i]) * (size - 5))
            plaintext += m
            rig.tls.obj.write(m)
            records += rig.tls.outgoing.read()  # one record per message
        rig.client_app.sendall(records)
        assert rig.pump.run(0.2) == []
        packets = []
        with contextlib.suppress(BlockingIOError):
            while True:
                packets.append(rig.backend_app.recv(1 << 16, socket.MSG_DONTWAIT))
        assert packets == [plaintext]
        assert (rig.client.received, rig.client.messages) == (len(plaintext), count)
    finally:
        rig.close()


def test_an_attached_session_keeps_its_record_buffers(tls_rig: TlsRig) -> None:
    """Python's contexts free a session's record buffers whenever they are empty (allocated
    again for every record); the pump's sessions keep them."""
    lib = _libssl()
    mode = lib.SSL_ctrl(_ssl_pointer(tls_rig.server.obj), 33, 0, None)  # SSL_CTRL_MODE
    assert mode & 0x10 == 0  # SSL_MODE_RELEASE_BUFFERS
    other = TlsPeer(_tls_contexts()[0], True)  # not attached: Python's default
    assert lib.SSL_ctrl(_ssl_pointer(other.obj), 33, 0, None) & 0x10


def test_pump_hands_back_tls_plaintext_past_the_budget(tls_rig: TlsRig) -> None:
    rig = tls_rig
    rig.client.budget = 10
    q = message(b"Q", b"select 12345\x00")
    rig.send(q)
    [(code, fd, _, n, arg)] = rig.pump.run(1.0)
    assert (code, fd, n, arg) == (_pump.PAST_END, rig.client.fd, len(q), q)  # plaintext


def test_pump_hands_back_unsent_tls_records_as_a_copy() -> None:
    rig = TlsRig()
    try:
        rig.client_proxy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        rig.client_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = os.urandom(1000)
        sent = bytearray()
        for _ in range(2000):
            rig.backend_app.sendall(message(b"D", body))
            sent += message(b"D", body)
            reports = rig.pump.run(0.05)
            if reports:
                break
        [(code, fd, _, _n, rest)] = reports
        assert (code, fd) == (_pump.PARTIAL, rig.backend.fd)
        assert type(rest) is bytes and rest  # ciphertext the client did not take, a copy
        # What reached the client, then the rest, decrypts to everything the backend lane read.
        got = rig.receive(b"") + rig.receive(rest)
        assert got == bytes(sent[: rig.backend.received])
    finally:
        rig.close()


def test_pump_reports_close_notify_and_bad_records(tls_rig: TlsRig) -> None:
    rig = tls_rig
    rig.send(message(b"Q", b"x\x00"))
    with pytest.raises(ssl.SSLWantReadError):
        rig.tls.obj.unwrap()  # close_notify
    rig.client_app.sendall(rig.tls.outgoing.read())
    [(code, fd, _, _, _)] = rig.pump.run(1.0)
    assert (code, fd) == (_pump.TLS_END, rig.client.fd)
    assert rig.backend_app.recv(100) == message(b"Q", b"x\x00")  # what came before it


def test_pump_reports_a_bad_tls_record_with_openssls_reason(tls_rig: TlsRig) -> None:
    rig = tls_rig
    rig.client_app.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))
    [(code, fd, _, _, reason)] = rig.pump.run(1.0)
    assert (code, fd) == (_pump.TLS_ERROR, rig.client.fd)
    assert isinstance(reason, str) and reason


def _ssl_pointer(obj: ssl.SSLObject) -> int:
    """The SSL* of an SSLObject (as _pump.c reads it, verified there; here for the test's
    own client, to drive what Python's ssl module has no call for)."""
    sslsock = obj._sslobj  # type: ignore[attr-defined]
    ptr = ctypes.c_void_p.from_address(
        id(sslsock) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
    ).value
    assert ptr is not None
    return ptr


def _libssl() -> ctypes.CDLL:
    lib = ctypes.CDLL("libssl.so.3")
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_renegotiate.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    lib.SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_ctrl.restype = ctypes.c_long
    return lib


def test_a_tls13_key_update_from_the_client_is_answered_and_data_keeps_flowing(
    tls_rig: TlsRig,
) -> None:
    rig = tls_rig
    assert rig.tls.obj.version() == "TLSv1.3"
    lib = _libssl()
    assert lib.SSL_key_update(_ssl_pointer(rig.tls.obj), 1) == 1  # SSL_KEY_UPDATE_REQUESTED
    q = message(b"Q", b"after key update\x00")
    rig.send(q)  # the KeyUpdate goes out with this record
    reports = rig.pump.run(0.2)
    for code, fd, _, _, _ in reports:
        # The server's own KeyUpdate answer, for Python to send.
        assert (code, fd) == (_pump.TLS_OWN, rig.client.fd)
        rig.client_app.sendall(rig.client.tls_own())
    assert rig.backend_app.recv(1000) == q
    reply = message(b"Z", b"I")
    rig.backend_app.sendall(reply)
    assert rig.pump.run(0.2) == []
    assert rig.receive() == reply
    rig.send(q)
    assert rig.pump.run(0.2) == []
    assert rig.backend_app.recv(1000) == q


def test_tls12_renegotiation_from_the_client_is_refused() -> None:
    rig = TlsRig(max_version=ssl.TLSVersion.TLSv1_2)
    try:
        assert rig.tls.obj.version() == "TLSv1.2"
        lib = _libssl()
        assert lib.SSL_renegotiate(_ssl_pointer(rig.tls.obj)) == 1
        with pytest.raises(ssl.SSLWantReadError):
            rig.tls.obj.do_handshake()  # the client's renegotiation ClientHello
        rig.client_app.sendall(rig.tls.outgoing.read())
        [(code, fd, _, _, _)] = rig.pump.run(1.0)
        # No handshake: a no_renegotiation alert, the only record the server writes.
        assert (code, fd) == (_pump.TLS_OWN, rig.client.fd)
        alert = rig.client.tls_own()
        assert alert
        rig.tls.incoming.write(alert)
        with pytest.raises(ssl.SSLError, match="NO_RENEGOTIATION"):
            rig.tls.obj.do_handshake()
    finally:
        rig.close()


def test_tls_attach_refuses_what_it_cannot_take_over(fd: int) -> None:
    server_ctx, client_ctx = _tls_contexts()
    server, client = TlsPeer(server_ctx, True), TlsPeer(client_ctx, False)
    lane = Lane(fd)
    # Before the handshake is complete.
    assert lane.tls_attach(server.obj, server.incoming, server.outgoing) is False
    _handshake(server, client)
    # A client-side session, and BIOs that are not the session's own.
    assert lane.tls_attach(client.obj, client.incoming, client.outgoing) is False
    assert lane.tls_attach(server.obj, ssl.MemoryBIO(), server.outgoing) is False
    assert lane.tls_attach(server.obj, server.outgoing, server.incoming) is False
    assert not lane.tls_in_c
    with pytest.raises(RuntimeError):
        lane.tls_encrypt(b"x")
    with pytest.raises(AttributeError):
        lane.tls_attach(object(), server.incoming, server.outgoing)
    assert lane.tls_attach(server.obj, server.incoming, server.outgoing) is True
    with pytest.raises(RuntimeError):
        lane.tls_attach(server.obj, server.incoming, server.outgoing)  # once


def test_lane_tls_methods_are_the_python_record_layer(fd: int) -> None:
    """What the loop's Python paths call: encrypt, take, decrypt (None / b"" at the end)."""
    server_ctx, client_ctx = _tls_contexts()
    server, client = TlsPeer(server_ctx, True), TlsPeer(client_ctx, False)
    _handshake(server, client)
    lane = Lane(fd)
    assert lane.tls_attach(server.obj, server.incoming, server.outgoing)
    del server  # the lane keeps the session alive
    gc.collect()
    client.incoming.write(lane.tls_encrypt(b"hello"))
    assert client.obj.read(100) == b"hello"
    assert lane.tls_decrypt(100) is None
    client.obj.write(b"world")
    lane.tls_take(client.outgoing.read())
    assert lane.tls_decrypt(3) == b"wor"
    assert lane.tls_decrypt(100) == b"ld"
    assert lane.tls_own() == b""
    lane.tls_take(b"")  # EOF without close_notify: the end of the stream
    assert lane.tls_decrypt(100) == b""


def test_an_audited_relay_keeps_its_c_record_layer() -> None:
    """The audit tap and the C record layer go together (the tap is fed the plaintext):
    a tapped lane still takes over its TLS session, and a lane whose TLS runs in C gets a
    tap; the tap goes on the relay's owner lane only, before it is pumped."""
    from waypoint.audit.session import session_tracker

    server_ctx, client_ctx = _tls_contexts()
    server, client = TlsPeer(server_ctx, True), TlsPeer(client_ctx, False)
    _handshake(server, client)
    server2, client2 = TlsPeer(server_ctx, True), TlsPeer(client_ctx, False)
    _handshake(server2, client2)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        tapped, backend = Lane(a.fileno()), Lane(c.fileno())
        tapped.link(backend)
        tapped.tap_enable(session_tracker({}), 256 * 1024)
        assert tapped.tls_attach(server.obj, server.incoming, server.outgoing) is True
        assert tapped.tls_in_c
        in_c, backend2 = Lane(b.fileno()), Lane(d.fileno())
        in_c.link(backend2)
        assert in_c.tls_attach(server2.obj, server2.incoming, server2.outgoing) is True
        in_c.tap_enable(session_tracker({}), 256 * 1024)
        with pytest.raises(RuntimeError, match="owner lane"):
            backend2.tap_enable(session_tracker({}), 256 * 1024)
    finally:
        for s in (a, b, c, d):
            s.close()
