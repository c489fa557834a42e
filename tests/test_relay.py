"""The relay, both implementations (epoll engine and trio streams), over real sockets."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import trio
import trustme

from waypoint.proxy.relay import (
    RECV_BUFFER_SIZE,
    RelayControl,
    RelayEngine,
    RelayEngineError,
    RelayResult,
    StreamRelay,
    client_tls,
    open_relay_engine,
)
from waypoint.proxy.streams import ServerTLSStream


def message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


FATAL = message(b"E", b"SFATAL\x00C57P01\x00Mbye\x00\x00")
LIMIT_FATAL = message(b"E", b"SFATAL\x00C53400\x00Mlim\x00\x00")


_RANDOM_TYPES = [t for t in range(0x41, 0x5B) if t != ord("X")]


def random_messages(size: int, rng: random.Random | None = None) -> bytes:
    """About ``size`` bytes of valid v3 framing with random types (A-Z but X: a client's
    Terminate ends its session, whoever closes first) and bodies."""
    rng = rng or random.Random()
    parts, total = [], 0
    while total < size:
        body = rng.randbytes(rng.choice([0, 1, 7, 60, 500, 8000, 100_000]))
        parts.append(message(bytes([rng.choice(_RANDOM_TYPES)]), body))
        total += len(parts[-1])
    return b"".join(parts)


def parse_messages(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a stream into whole messages; returns (messages, trailing partial bytes)."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        end = pos + 1 + length
        if end > len(data):
            break
        out.append(data[pos:end])
        pos = end
    return out, data[pos:]


def epoll_registered_fds(engine: RelayEngine) -> int:
    with open(f"/proc/self/fdinfo/{engine.epoll_fileno}") as f:
        return sum(1 for line in f if line.startswith("tfd:"))


@attrs.define
class Session:
    """One relayed connection: the application ends and the relay's control handle."""

    client: trio.abc.Stream  # what the PostgreSQL client holds (TLS in "engine-tls*")
    backend: trio.SocketStream  # what the PostgreSQL server holds
    control: RelayControl
    proxy_socks: tuple[socket.socket, socket.socket]
    result_fn: Callable[[], Any]

    async def result(self) -> RelayResult:
        with trio.fail_after(10):
            r: RelayResult = await self.result_fn()
        return r

    def close_proxy_side(self) -> None:
        for s in self.proxy_socks:
            s.close()


def _pair(kind: str, bufsize: int | None) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        a, b = socket.socketpair()
    else:
        lst = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
        lst.close()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if bufsize is not None:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    return a, b


def _stream(sock: socket.socket) -> trio.SocketStream:
    sock.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


_CA = trustme.CA()
_SERVER_CERT = _CA.issue_cert("relay.test")


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _SERVER_CERT.configure_cert(server)
    client = ssl.create_default_context()
    _CA.configure_trust(client)
    return server, client


async def _tls_pair(
    client_app: socket.socket, client_proxy: socket.socket
) -> tuple[trio.SSLStream[trio.SocketStream], ServerTLSStream]:
    """Handshake over the client's connection: (the app's TLS stream, the proxy's, as a
    session makes it)."""
    server_ctx, client_ctx = _tls_contexts()
    app = trio.SSLStream(
        _stream(client_app), client_ctx, server_hostname="relay.test", https_compatible=True
    )
    proxy = ServerTLSStream(_stream(client_proxy), server_ctx)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(app.do_handshake)
            n.start_soon(proxy.do_handshake)
    return app, proxy


@attrs.define
class Harness:
    kind: str
    engine: RelayEngine | None
    nursery: trio.Nursery

    async def open(
        self, *, socket_kind: str = "unix", bufsize: int | None = None, **kw: Any
    ) -> Session:
        client_app, client_proxy = _pair(socket_kind, bufsize)
        backend_proxy, backend_app = _pair(socket_kind, bufsize)
        if self.engine is not None and self.kind.startswith("engine-tls"):
            app, proxy = await _tls_pair(client_app, client_proxy)
            handover = proxy.handover()
            raw = proxy.transport_stream
            assert isinstance(raw, trio.SocketStream)
            tls_sock = socket.socket(fileno=raw.socket.detach())
            handle = self.engine.start_relay(tls_sock, backend_proxy, client_tls=handover, **kw)
            assert_tls_path(handle, in_c=self.kind == "engine-tls")
            return Session(
                app, _stream(backend_app), handle, (tls_sock, backend_proxy), handle.wait
            )
        if self.engine is not None:
            if self.kind == "engine-py":
                # Header hooks keep a relay off the C loop: the Python read path serves it.
                kw.setdefault("on_client_header", lambda t, n: None)
                kw.setdefault("on_backend_header", lambda t, n: None)
            handle = self.engine.start_relay(client_proxy, backend_proxy, **kw)
            return Session(
                _stream(client_app),
                _stream(backend_app),
                handle,
                (client_proxy, backend_proxy),
                handle.wait,
            )
        relay = StreamRelay(_stream(client_proxy), _stream(backend_proxy), **kw)
        done = trio.Event()
        box: list[RelayResult] = []

        async def run() -> None:
            box.append(await relay.wait())
            done.set()

        self.nursery.start_soon(run)

        async def result() -> RelayResult:
            await done.wait()
            return box[0]

        return Session(
            _stream(client_app), _stream(backend_app), relay, (client_proxy, backend_proxy), result
        )


def assert_tls_path(handle: Any, *, in_c: bool) -> None:
    """The relay's client TLS record layer runs where the test expects it: in C on the
    client lane (``tls_attach`` took the session over), or in Python."""
    client = handle._relay.client
    assert client.tls is not None
    assert client.tls.in_c is in_c and client.tls_in_c is in_c
    assert handle._relay.pumped is (in_c and client.hook is None and handle._relay.backend.hook is None)


#: engine-tls: client TLS with its record layer in C; engine-tls-py: in Python (c_tls=False).
@pytest.fixture(params=["engine", "engine-py", "engine-tls", "engine-tls-py", "streams"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        if request.param.startswith("engine"):
            async with open_relay_engine(c_tls=request.param != "engine-tls-py") as engine:
                yield Harness(request.param, engine, nursery)
        else:
            yield Harness("streams", None, nursery)
        nursery.cancel_scope.cancel()


async def read_all(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(65536)
        if not data:
            break
        buf += data
    return bytes(buf)


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    buf = bytearray()
    while data := await stream.receive_some(65536):
        buf += data
    return bytes(buf)


# --------------------------------------------------------------------------------------


async def test_large_random_payloads_pass_both_ways_unchanged(harness: Harness) -> None:
    s = await harness.open(socket_kind="tcp")
    up, down = random_messages(3_000_000), random_messages(5_000_000)
    got: dict[str, bytes] = {}

    async def side(
        name: str, out: trio.abc.Stream, inp: trio.abc.Stream, data: bytes, n: int
    ) -> None:
        async with trio.open_nursery() as n2:
            n2.start_soon(out.send_all, data)
            got[name] = await read_all(inp, n)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(side, "up", s.client, s.backend, up, len(up))
            n.start_soon(side, "down", s.backend, s.client, down, len(down))
    assert got["up"] == up
    assert got["down"] == down
    assert s.control.bytes_from_client == len(up)
    assert s.control.bytes_from_backend == len(down)
    await s.client.aclose()
    result = await s.result()
    assert result.reason == "client_closed"
    assert (result.bytes_from_client, result.bytes_from_backend) == (len(up), len(down))


async def test_many_concurrent_relays_each_pass_their_own_bytes(harness: Harness) -> None:
    sessions = [await harness.open(socket_kind="tcp") for _ in range(40)]
    payloads = [(random_messages(200_000), random_messages(300_000)) for _ in sessions]

    async def exercise(s: Session, up: bytes, down: bytes) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(s.client.send_all, up)
            n.start_soon(s.backend.send_all, down)
            assert await read_all(s.backend, len(up)) == up
            assert await read_all(s.client, len(down)) == down
        await s.backend.aclose()
        result = await s.result()
        assert result.reason == "backend_closed"
        assert result.bytes_from_client == len(up)
        assert result.bytes_from_backend == len(down)

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for s, (up, down) in zip(sessions, payloads, strict=True):
                n.start_soon(exercise, s, up, down)
    if harness.engine is not None:
        assert harness.engine.active_relays == 0


@pytest.mark.parametrize("closer", ["client", "backend"])
async def test_eof_from_either_side_ends_relay_with_that_reason(
    harness: Harness, closer: str
) -> None:
    s = await harness.open()
    await s.client.send_all(message(b"Q", b"select 1\x00"))
    assert await read_all(s.backend, 14) == message(b"Q", b"select 1\x00")
    await s.backend.send_all(message(b"Z", b"I"))
    assert await read_all(s.client, 6) == message(b"Z", b"I")
    await (s.client if closer == "client" else s.backend).aclose()
    result = await s.result()
    assert result.reason == f"{closer}_closed"
    assert result.error is None
    assert result.messages_from_client == 1


async def test_backend_eof_flushes_everything_it_sent_to_a_slow_client(harness: Harness) -> None:
    s = await harness.open(bufsize=32 * 1024)
    payload = random_messages(1_500_000)

    async def backend_writes_then_closes() -> None:
        await s.backend.send_all(payload)
        await s.backend.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(backend_writes_then_closes)
        await trio.sleep(0.3)  # the client does not read yet: the relay must hold back
        received = await read_all(s.client, len(payload))
    assert received == payload
    result = await s.result()
    assert result.reason == "backend_closed"
    assert result.bytes_from_backend == len(payload)


async def test_slow_reader_keeps_relay_buffering_bounded(harness: Harness) -> None:
    s = await harness.open(bufsize=64 * 1024)
    total = 305 * 65536
    sent = 0

    async def flood() -> None:
        nonlocal sent
        chunk = message(b"D", bytes(65531))
        while sent < total:
            await s.backend.send_all(chunk)
            sent += len(chunk)

    async with trio.open_nursery() as n:
        n.start_soon(flood)
        peak = 0
        for _ in range(20):
            await trio.sleep(0.02)
            peak = max(peak, s.control.buffered_bytes)
        # Nobody reads on the client side: the backend must be blocked long before 20 MB.
        assert sent < 3_000_000
        assert s.control.bytes_from_backend < 3_000_000
        # TLS adds its record framing (about 22 bytes per 16 KiB record) to one buffer.
        assert peak <= RECV_BUFFER_SIZE + (1024 if harness.kind.startswith("engine-tls") else 0)
        received = await read_all(s.client, total)
        assert len(received) == total
        n.cancel_scope.cancel()


async def test_byte_limit_sends_fatal_after_whole_messages(harness: Harness) -> None:
    s = await harness.open(max_bytes=10_000, byte_limit_error=LIMIT_FATAL)
    rows = [message(b"D", os.urandom(random.randrange(50, 900))) for _ in range(60)]
    stream = b"".join(rows)

    async def backend_sends() -> None:
        # Odd-sized writes so that messages straddle reads.
        with contextlib.suppress(trio.BrokenResourceError):  # the proxy closed it
            for i in range(0, len(stream), 777):
                await s.backend.send_all(stream[i : i + 777])
                await trio.sleep(0)

    async with trio.open_nursery() as n:
        n.start_soon(backend_sends)
        result = await s.result()
        n.cancel_scope.cancel()
    s.close_proxy_side()
    received = await read_to_eof(s.client)
    msgs, rest = parse_messages(received)
    assert rest == b""
    assert msgs[-1] == LIMIT_FATAL
    assert msgs[:-1] == rows[: len(msgs) - 1]
    assert result.reason == "byte_limit"
    assert result.fatal_sent
    assert result.bytes_from_backend > 10_000 - 1000
    assert sum(map(len, msgs[:-1])) <= result.bytes_from_backend


async def test_byte_limit_counts_client_bytes_too(harness: Harness) -> None:
    s = await harness.open(max_bytes=5_000, byte_limit_error=LIMIT_FATAL)
    await s.client.send_all(message(b"Q", bytes(6_000)))
    result = await s.result()
    s.close_proxy_side()
    assert await read_to_eof(s.client) == LIMIT_FATAL
    assert result.reason == "byte_limit"
    assert result.fatal_sent


async def test_byte_limit_is_not_crossed_by_exactly_max_bytes(harness: Harness) -> None:
    query, ready = message(b"Q", b"select 1\x00"), message(b"Z", b"I")
    s = await harness.open(max_bytes=len(query) + len(ready), byte_limit_error=LIMIT_FATAL)
    await s.client.send_all(query)
    assert await read_all(s.backend, len(query)) == query
    await s.backend.send_all(ready)
    assert await read_all(s.client, len(ready)) == ready
    assert s.control.bytes_from_client + s.control.bytes_from_backend == len(query + ready)
    await s.client.send_all(query)  # past the limit: not forwarded, the FATAL goes out
    result = await s.result()
    s.close_proxy_side()
    assert await read_to_eof(s.client) == LIMIT_FATAL
    assert await read_to_eof(s.backend) == b""
    assert result.reason == "byte_limit"
    assert result.fatal_sent


async def test_handshake_leftovers_past_the_byte_limit_end_the_relay(harness: Harness) -> None:
    leftover = message(b"S", b"a\x00b\x00") + message(b"Z", b"I")
    s = await harness.open(
        max_bytes=len(leftover) - 1, byte_limit_error=LIMIT_FATAL, initial_to_client=leftover
    )
    result = await s.result()  # ends without any further input
    s.close_proxy_side()
    assert await read_to_eof(s.client) == leftover + LIMIT_FATAL
    assert await read_to_eof(s.backend) == b""
    assert result.reason == "byte_limit"
    assert result.fatal_sent


async def test_terminate_mid_stream_injects_fatal_exactly_at_a_boundary(harness: Harness) -> None:
    s = await harness.open()
    rng = random.Random(7)
    rows = [message(b"D", rng.randbytes(rng.choice([5, 100, 3000, 70_000]))) for _ in range(3000)]
    stream = b"".join(rows)
    received = bytearray()

    async def backend_sends() -> None:
        pos = 0
        with contextlib.suppress(trio.BrokenResourceError):  # the proxy closed it
            while pos < len(stream):
                step = rng.randrange(1, 20_000)
                await s.backend.send_all(stream[pos : pos + step])
                pos += step

    async def client_reads() -> None:
        while data := await s.client.receive_some(65536):
            received.extend(data)

    async with trio.open_nursery() as n:
        n.start_soon(backend_sends)
        n.start_soon(client_reads)
        while len(received) < 2_000_000:
            await trio.sleep(0.005)
        s.control.terminate(FATAL)
        result = await s.result()
        assert result.reason == "terminated"
        assert result.fatal_sent, result
        s.close_proxy_side()
        with trio.fail_after(5):
            while not received.endswith(FATAL) or len(parse_messages(bytes(received))[1]):
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    msgs, rest = parse_messages(bytes(received))
    assert rest == b"", (len(rest), rest[:20], msgs[-1][:20], len(msgs), len(received))
    assert msgs[-1] == FATAL
    assert msgs[:-1] == rows[: len(msgs) - 1]
    assert result.reason == "terminated"
    assert result.fatal_sent


async def test_terminate_while_idle_sends_fatal_at_once(harness: Harness) -> None:
    s = await harness.open()
    await s.backend.send_all(message(b"Z", b"I"))
    assert await read_all(s.client, 6) == message(b"Z", b"I")
    start = time.monotonic()
    s.control.terminate(FATAL)
    result = await s.result()
    assert time.monotonic() - start < 1.0
    s.close_proxy_side()
    assert await read_to_eof(s.client) == FATAL
    assert result.reason == "terminated"
    assert result.fatal_sent
    # A second terminate after the end changes nothing.
    s.control.terminate(LIMIT_FATAL)
    assert (await s.result()).reason == "terminated"


async def test_terminate_with_backend_stuck_mid_message_closes_after_the_bound(
    harness: Harness,
) -> None:
    s = await harness.open()
    partial = message(b"D", bytes(5000))[:1200]
    await s.backend.send_all(partial)
    assert await read_all(s.client, len(partial)) == partial
    start = time.monotonic()
    s.control.terminate(FATAL, timeout=0.3)
    result = await s.result()
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 2.0
    s.close_proxy_side()
    assert await read_to_eof(s.client) == b""  # no FATAL in the middle of a message
    assert result.reason == "terminated"
    assert not result.fatal_sent


async def test_terminate_waits_for_the_end_of_a_long_message(harness: Harness) -> None:
    s = await harness.open()
    big = message(b"D", os.urandom(300_000))
    await s.backend.send_all(big[:1000])
    assert await read_all(s.client, 1000) == big[:1000]
    s.control.terminate(FATAL)
    await trio.sleep(0.05)
    got: list[bytes] = []

    async def client_reads() -> None:
        got.append(await read_to_eof(s.client))

    async with trio.open_nursery() as n:
        n.start_soon(client_reads)
        await s.backend.send_all(big[1000:] + message(b"C", b"SELECT 1\x00"))
        result = await s.result()
        s.close_proxy_side()
    assert got == [big[1000:] + FATAL]
    assert result.fatal_sent


async def test_client_input_after_terminate_is_not_forwarded(harness: Harness) -> None:
    s = await harness.open()
    partial = message(b"D", bytes(100))[:50]
    await s.backend.send_all(partial)
    assert await read_all(s.client, 50) == partial
    s.control.terminate(FATAL, timeout=0.5)
    await trio.sleep(0.05)
    await s.client.send_all(message(b"Q", b"drop table x\x00"))
    await s.result()
    s.close_proxy_side()
    assert await read_to_eof(s.backend) == b""


async def test_malformed_backend_length_ends_relay_with_error(harness: Harness) -> None:
    s = await harness.open()
    await s.backend.send_all(b"D\x00\x00\x00\x02")
    result = await s.result()
    assert result.reason == "error"
    assert result.error is not None and "invalid message length 2" in result.error


async def test_handshake_leftovers_go_first_and_are_counted(harness: Harness) -> None:
    leftover = message(b"S", b"a\x00b\x00") + message(b"Z", b"I")
    s = await harness.open(initial_to_client=leftover, initial_to_backend=message(b"Q", b"x\x00"))
    assert await read_all(s.client, len(leftover)) == leftover
    assert await read_all(s.backend, 7) == message(b"Q", b"x\x00")
    await s.client.aclose()
    result = await s.result()
    assert result.bytes_from_backend == len(leftover)
    assert result.bytes_from_client == 7
    assert result.messages_from_backend == 2


async def test_client_header_hook_sees_each_statement_message(harness: Harness) -> None:
    seen: list[str] = []
    s = await harness.open(on_client_header=lambda t, n: seen.append(chr(t)))
    batch = (
        message(b"P", b"\x00select 1\x00\x00\x00") + message(b"B", bytes(10)) + message(b"S", b"")
    )
    await s.client.send_all(batch[:3])
    await s.client.send_all(batch[3:] + message(b"Q", b"select 2\x00"))
    assert await read_all(s.backend, len(batch) + 14) == batch + message(b"Q", b"select 2\x00")
    assert seen == ["P", "B", "S", "Q"]


async def test_cancelled_wait_tears_the_relay_down(harness: Harness) -> None:
    s = await harness.open()
    with trio.move_on_after(0.1) as scope:
        await s.result()
    assert scope.cancelled_caught
    if harness.engine is not None:
        assert harness.engine.active_relays == 0
        assert epoll_registered_fds(harness.engine) == 1  # only the wake-up eventfd
        handle = s.control
        assert handle.result is not None  # type: ignore[attr-defined]
        assert handle.result.reason == "terminated"  # type: ignore[attr-defined]


# -- engine only -------------------------------------------------------------------------


async def test_two_hundred_relays_opened_and_closed_leave_no_registered_fds() -> None:
    async with open_relay_engine() as engine:
        assert epoll_registered_fds(engine) == 1
        for round_ in range(4):
            pairs = []
            handles = []
            for _ in range(50):
                c_app, c_proxy = socket.socketpair()
                b_proxy, b_app = socket.socketpair()
                handles.append(engine.start_relay(c_proxy, b_proxy))
                pairs.append((c_app, c_proxy, b_proxy, b_app))
            await trio.sleep(0.02)
            assert engine.active_relays == 50
            for i, (c_app, _, _, b_app) in enumerate(pairs):
                (c_app if (i + round_) % 2 else b_app).close()
            for h in handles:
                with trio.fail_after(5):
                    assert (await h.wait()).reason in ("client_closed", "backend_closed")
            for p in pairs:
                for sock in p:
                    sock.close()
            assert engine.active_relays == 0
            assert epoll_registered_fds(engine) == 1


async def test_plain_relays_run_in_the_c_loop_and_hooked_ones_in_python() -> None:
    socks = [s for _ in range(4) for s in socket.socketpair()]
    c_app, c_proxy, b_proxy, b_app, c2_app, c2_proxy, b2_proxy, b2_app = socks
    async with open_relay_engine() as engine:
        plain = engine.start_relay(c_proxy, b_proxy)
        seen: list[int] = []
        hooked = engine.start_relay(c2_proxy, b2_proxy, on_client_header=lambda t, n: seen.append(t))
        for app, far in ((c_app, b_app), (c2_app, b2_app)):
            app.sendall(message(b"Q", b"select 1\x00"))
            far.settimeout(5)
            assert far.recv(100) == message(b"Q", b"select 1\x00")
        assert plain._relay.client.in_pump and plain._relay.backend.in_pump
        assert not hooked._relay.client.in_pump and not hooked._relay.backend.in_pump
        assert seen == [ord("Q")]
        assert len(engine._pump) == 2
        c_app.close()
        with trio.fail_after(5):
            assert (await plain.wait()).reason == "client_closed"
        assert not plain._relay.client.in_pump and len(engine._pump) == 0
    for sock in socks:
        sock.close()


async def test_engine_thread_exits_on_context_exit_and_ends_live_relays() -> None:
    c_app, c_proxy = socket.socketpair()
    b_proxy, b_app = socket.socketpair()
    async with open_relay_engine() as engine:
        handle = engine.start_relay(c_proxy, b_proxy)
        thread = engine._thread
        assert thread is not None and thread.is_alive()
    assert not thread.is_alive()
    assert handle.result is not None
    assert handle.result.reason == "terminated"
    assert handle.result.error == "relay engine stopped"
    with pytest.raises(RelayEngineError):
        engine.start_relay(c_proxy, b_proxy)
    for sock in (c_app, c_proxy, b_proxy, b_app):
        assert sock.fileno() >= 0  # the engine never closes sockets
        sock.close()


async def test_start_relay_rejects_bad_arguments() -> None:
    async with open_relay_engine() as engine:
        a, b = socket.socketpair()
        with pytest.raises(ValueError, match="different sockets"):
            engine.start_relay(a, a)
        with pytest.raises(ValueError, match="byte_limit_error"):
            engine.start_relay(a, b, max_bytes=10)
        with pytest.raises(ValueError, match="max_bytes"):
            engine.start_relay(a, b, max_bytes=-1, byte_limit_error=FATAL)
        a.close()
        with pytest.raises(ValueError, match="closed socket"):
            engine.start_relay(a, b)
        b.close()
        assert engine.active_relays == 0


async def _tls_relay(
    engine: RelayEngine, prefetch: int = 0, forward: bool = True, in_c: bool | None = None, **kw: Any
) -> tuple[trio.SSLStream[trio.SocketStream], trio.SocketStream, socket.socket, Any]:
    """A TLS client relayed by the engine. With ``prefetch``, the proxy's trio stream
    first reads that many plaintext bytes (passed on as ``initial_to_backend`` if
    ``forward``, else consumed as a handshake would), so the rest of what the client
    sent sits inside the TLS objects at the hand-over."""
    client_app, client_proxy = _pair("tcp", None)
    backend_proxy, backend_app = _pair("tcp", None)
    app, proxy = await _tls_pair(client_app, client_proxy)
    initial = b""
    if prefetch:
        await app.send_all(kw.pop("pipelined"))
        while len(initial) < prefetch:
            initial += await proxy.receive_some(prefetch - len(initial))
    handover = proxy.handover()
    raw = proxy.transport_stream
    assert isinstance(raw, trio.SocketStream)
    tls_sock = socket.socket(fileno=raw.socket.detach())
    handle = engine.start_relay(
        tls_sock,
        backend_proxy,
        client_tls=handover,
        initial_to_backend=initial if forward else b"",
        **kw,
    )
    assert_tls_path(handle, in_c=engine._loop.c_tls if in_c is None else in_c)
    return app, _stream(backend_app), tls_sock, handle


@pytest.mark.parametrize("c_tls", [True, False], ids=["c-tls", "py-tls"])
@pytest.mark.parametrize("forward", [True, False])
async def test_tls_input_buffered_at_handover_is_relayed_first(forward: bool, c_tls: bool) -> None:
    first = message(b"Q", b"select 1\x00")
    batch = message(b"P", b"\x00select 1\x00\x00\x00") + message(b"S", b"") * 50
    expected = first + batch if forward else batch
    async with open_relay_engine(c_tls=c_tls) as engine:
        app, backend, tls_sock, handle = await _tls_relay(
            engine, prefetch=len(first), forward=forward, pipelined=first + batch
        )
        with trio.fail_after(10):
            assert await read_all(backend, len(expected)) == expected
            await backend.send_all(message(b"Z", b"I"))
            assert await read_all(app, 6) == message(b"Z", b"I")
            await app.aclose()
            result = await handle.wait()
        tls_sock.close()
    assert result.reason == "client_closed"
    assert result.bytes_from_client == len(expected)
    assert result.messages_from_client == (52 if forward else 51)


async def test_without_c_tls_the_engine_keeps_the_python_record_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter whose OpenSSL the C loop cannot bind (client_tls.c_tls_available)
    gets the Python record layer, which relays all the same."""
    monkeypatch.setattr(client_tls, "c_tls_available", lambda: False)
    async with open_relay_engine() as engine:
        app, backend, tls_sock, handle = await _tls_relay(engine, in_c=False)
        with trio.fail_after(10):
            q = message(b"Q", b"select 1\x00")
            await app.send_all(q)
            assert await read_all(backend, len(q)) == q
            reply = message(b"D", os.urandom(100_000)) + message(b"Z", b"I")
            await backend.send_all(reply)
            assert await read_all(app, len(reply)) == reply
            await app.aclose()
            result = await handle.wait()
        tls_sock.close()
    assert result.reason == "client_closed"


@pytest.mark.parametrize("c_tls", [True, False], ids=["c-tls", "py-tls"])
async def test_tls_close_notify_ends_the_relay_as_client_closed(c_tls: bool) -> None:
    async with open_relay_engine(c_tls=c_tls) as engine:
        app, backend, tls_sock, handle = await _tls_relay(engine)
        with trio.fail_after(10):
            q = message(b"Q", b"select 1\x00")
            await app.send_all(q)
            assert await read_all(backend, len(q)) == q
            # close_notify alone, the socket left open (no reset racing it): what
            # trio.SSLStream's aclose() writes before it closes the socket.
            ssl_object: ssl.SSLObject = getattr(app, "_ssl_object")  # noqa: B009
            outgoing: ssl.MemoryBIO = getattr(app, "_outgoing")  # noqa: B009
            with pytest.raises(ssl.SSLWantReadError):
                ssl_object.unwrap()
            await app.transport_stream.send_all(outgoing.read())
            result = await handle.wait()
        await app.transport_stream.aclose()
        tls_sock.close()
    assert result.reason == "client_closed" and result.error is None
    assert result.bytes_from_client == len(q)


@pytest.mark.parametrize("c_tls", [True, False], ids=["c-tls", "py-tls"])
async def test_tls_garbage_from_the_client_ends_the_relay_with_an_error(c_tls: bool) -> None:
    async with open_relay_engine(c_tls=c_tls) as engine:
        app, _backend, tls_sock, handle = await _tls_relay(engine)
        # Bytes that are no TLS record, written under the TLS layer.
        raw = app.transport_stream
        assert isinstance(raw, trio.SocketStream)
        with trio.fail_after(10):
            await raw.send_all(b"\x17\x03\x03\x00\x10" + bytes(16))
            result = await handle.wait()
        tls_sock.close()
    assert result.reason == "error"
    assert result.error is not None and result.error.startswith("client TLS: ")


async def test_a_relay_that_stops_at_terminate_keeps_the_backend_and_says_it_is_idle(
    harness: Harness,
) -> None:
    """The pool's relay, in every implementation: the client's Terminate does not reach the
    backend, and the verdict gives the backend's last ReadyForQuery status."""
    s = await harness.open(stop_at_terminate=True)
    query = message(b"Q", b"select 1\x00")
    answer = message(b"C", b"SELECT 1\x00") + message(b"Z", b"I")
    with trio.fail_after(10):
        await s.client.send_all(query)
        assert await read_all(s.backend, len(query)) == query
        await s.backend.send_all(answer)
        assert await read_all(s.client, len(answer)) == answer
        await s.client.send_all(message(b"X", b""))
    # The relay is over at the Terminate, without the client closing (asyncpg waits for the
    # end of the stream first; the session closes the client's connection after the relay).
    result = await s.result()
    assert result.reason == "client_closed"
    assert result.ready_status == b"I"
    # The backend connection is open and got nothing more: it can take the next query.
    s.close_proxy_side()
    with trio.fail_after(10):
        assert await read_to_eof(s.backend) == b""


async def test_a_relay_that_does_not_stop_passes_the_terminate_on(harness: Harness) -> None:
    s = await harness.open()
    with trio.fail_after(10):
        await s.client.send_all(message(b"X", b""))
        assert await read_all(s.backend, 5) == message(b"X", b"")
        await s.client.aclose()
    result = await s.result()
    assert result.ready_status is None
