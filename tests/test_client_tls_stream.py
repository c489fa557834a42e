"""Client TLS on Waypoint's own SSLObject (waypoint/proxy/streams.py): the handshake from a
peeked ClientHello, the startup exchange over it, the hand-over of the very same TLS state to
the epoll engine (ciphertext the client sent ahead included), both directions at once under
the stream relay, a stalled handshake bounded by the caller's deadline, and the session
needing nothing of ``trio.SSLStream``."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing
import trustme
from e2e_support import LISTENER, create_app_database, e2e_env, make_cert_files, tls_session
from pgcluster import PgCluster

from waypoint.proxy.relay import RelayResult, StreamRelay, open_relay_engine
from waypoint.proxy.streams import ServerTLSStream
from waypoint.proxy.tls import ALPN_POSTGRESQL, client_hello_length

_CA = trustme.CA()
_CERT = _CA.issue_cert("client-tls.test")


def _contexts(*, alpn: bool = False) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _CERT.configure_cert(server)
    client = ssl.create_default_context()
    _CA.configure_trust(client)
    if alpn:
        server.set_alpn_protocols([ALPN_POSTGRESQL])
        client.set_alpn_protocols([ALPN_POSTGRESQL])
    return server, client


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    lst.close()
    return a, b


def _stream(sock: socket.socket) -> trio.SocketStream:
    sock.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _peek_hello(raw: trio.SocketStream) -> bytes:
    """What the session does before it picks a certificate: read up to a whole ClientHello."""
    buf = b""
    while client_hello_length(buf) is None:
        buf += await raw.receive_some(4096)
    return buf


async def _read_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def _handshake(
    *, alpn: bool = False
) -> tuple[trio.SSLStream[trio.SocketStream], ServerTLSStream, trio.SocketStream]:
    """(the client's TLS stream, Waypoint's, Waypoint's raw socket stream)."""
    server_ctx, client_ctx = _contexts(alpn=alpn)
    app_sock, proxy_sock = _tcp_pair()
    app = trio.SSLStream(_stream(app_sock), client_ctx, server_hostname="client-tls.test")
    raw = _stream(proxy_sock)
    box: list[ServerTLSStream] = []

    async def server() -> None:
        tls = ServerTLSStream(raw, server_ctx, await _peek_hello(raw))
        await tls.do_handshake()
        box.append(tls)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(app.do_handshake)
            n.start_soon(server)
    return app, box[0], raw


async def _client_hello_only() -> tuple[
    socket.socket, ssl.SSLObject, ssl.MemoryBIO, ServerTLSStream
]:
    """(the client's socket, its TLS state and the BIO that feeds it, Waypoint's TLS stream)
    once the client has sent its ClientHello and nothing after it: the server's handshake
    is still to run."""
    server_ctx, client_ctx = _contexts()
    app_sock, proxy_sock = _tcp_pair()
    raw = _stream(proxy_sock)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="client-tls.test")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    app_sock.sendall(outgoing.read())
    return app_sock, client, incoming, ServerTLSStream(raw, server_ctx, await _peek_hello(raw))


async def test_handshake_from_a_peeked_client_hello_then_startup_both_ways() -> None:
    app, tls, _raw = await _handshake(alpn=True)
    assert tls.selected_alpn_protocol() == ALPN_POSTGRESQL
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with trio.fail_after(10):
        await app.send_all(b"startup packet")
        assert await _read_exactly(tls, 14) == b"startup packet"
        await tls.send_all(b"R" + bytes(8))
        assert await _read_exactly(app, 9) == b"R" + bytes(8)
        await app.aclose()
        assert await tls.receive_some() == b""  # close_notify
        await tls.aclose()


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


async def test_handover_gives_the_engine_the_same_tls_state_and_what_the_client_sent_ahead() -> (
    None
):
    first = _message(b"Q", b"select 1\x00")
    ahead = _message(b"P", b"\x00select 1\x00\x00\x00") + _message(b"S", b"") * 40
    app, tls, raw = await _handshake()
    backend_proxy, backend_app_sock = _tcp_pair()
    backend_app = _stream(backend_app_sock)
    async with open_relay_engine() as engine:
        with trio.fail_after(10):
            await app.send_all(first + ahead)
            # The session reads its packet; the rest of what the client sent stays inside
            # the TLS objects (undecrypted ciphertext in the incoming BIO, or plaintext in
            # the SSLObject) and must reach the backend after it, in order.
            got = await _read_exactly(tls, len(first))
            assert got == first
            handover = tls.handover()
            assert handover.ssl_object is tls.ssl_object
            assert handover.outgoing.pending == 0 and handover.unsent == b""
            with pytest.raises(trio.ClosedResourceError):
                await tls.send_all(b"x")
            client_sock = socket.socket(fileno=raw.socket.detach())
            handle = engine.start_relay(
                client_sock, backend_proxy, client_tls=handover, initial_to_backend=got
            )
            assert await _read_exactly(backend_app, len(first + ahead)) == first + ahead
            reply = _message(b"D", os.urandom(50_000)) + _message(b"Z", b"I")
            await backend_app.send_all(reply)
            assert await _read_exactly(app, len(reply)) == reply
            await app.aclose()
            result = await handle.wait()
            await tls.aclose()  # closes the (detached) socket object only
        client_sock.close()
        backend_proxy.close()
        await backend_app.aclose()
    assert result.reason == "client_closed"
    assert result.bytes_from_client == len(first + ahead)


async def test_stream_relay_over_the_tls_stream_moves_both_directions_at_once() -> None:
    """The trio stream relay (backend TLS) reads and writes the client's TLS stream from two
    tasks at the same time."""
    app, tls, _raw = await _handshake()
    backend_proxy, backend_app_sock = _tcp_pair()
    backend_app = _stream(backend_app_sock)
    relay = StreamRelay(tls, _stream(backend_proxy))
    up = b"".join(_message(b"d", os.urandom(3000)) for _ in range(200))
    down = b"".join(_message(b"D", os.urandom(3000)) for _ in range(200))
    got_up = bytearray()
    got_down = bytearray()
    results: list[RelayResult] = []

    async def read_into(stream: trio.abc.Stream, out: bytearray, n: int) -> None:
        out += await _read_exactly(stream, n)

    async def run_relay() -> None:
        results.append(await relay.wait())

    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            outer.start_soon(run_relay)
            async with trio.open_nursery() as n:
                n.start_soon(app.send_all, up)
                n.start_soon(backend_app.send_all, down)
                n.start_soon(read_into, backend_app, got_up, len(up))
                n.start_soon(read_into, app, got_down, len(down))
            assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
            await app.aclose()
    result = results[0]
    assert result.reason == "client_closed"
    assert result.bytes_from_client == len(up)
    assert result.bytes_from_backend == len(down)
    await tls.aclose()
    await backend_app.aclose()


async def test_a_stalled_handshake_ends_at_the_callers_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that sends its ClientHello and then nothing: the handshake waits only as long
    as the session's deadline, and the half-done stream is unusable afterwards."""
    app_sock, _client, _incoming, tls = await _client_hello_only()
    with trio.move_on_after(15) as scope:
        await tls.do_handshake()
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await tls.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError):
        tls.handover()
    await tls.aclose()
    app_sock.close()


async def test_a_read_cut_short_by_a_deadline_leaves_the_stream_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cancelled receive takes no bytes off the socket: after its deadline the session can
    still answer over TLS, and a later read gets what the client sent meanwhile."""
    app, tls, _raw = await _handshake()
    with trio.move_on_after(15) as scope:
        await tls.receive_some()
    assert scope.cancelled_caught
    with trio.fail_after(10):
        await tls.send_all(b"E fatal")
        assert await _read_exactly(app, 7) == b"E fatal"
        await app.send_all(b"late")
        assert await _read_exactly(tls, 4) == b"late"
    await app.aclose()
    await tls.aclose()


async def test_garbage_after_the_client_hello_fails_the_handshake_with_an_alert() -> None:
    app_sock, client, incoming, tls = await _client_hello_only()
    app_sock.sendall(b"\x17\x03\x03\x00\x10" + bytes(16))
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        await tls.do_handshake()
    assert isinstance(info.value.__cause__, ssl.SSLError)
    await tls.aclose()
    app_sock.settimeout(10)
    answer = b""
    while chunk := app_sock.recv(65536):
        answer += chunk
    # The client, fed what came back, finds the alert (encrypted under TLS 1.3).
    incoming.write(answer)
    incoming.write_eof()
    with pytest.raises(ssl.SSLError) as alert:
        client.do_handshake()
        client.read(1024)
    assert "ALERT" in str(alert.value).upper(), alert.value
    app_sock.close()


def _connect_error(dsn: str) -> str:
    try:
        with psycopg.connect(dsn, connect_timeout=20):
            return "connected"
    except psycopg.OperationalError as exc:
        return str(exc)


async def test_the_handshake_deadline_fatal_reaches_a_tls_client(
    pg: PgCluster, tmp_path: Path
) -> None:
    """tailscaled hangs on the whois: at the handshake deadline the client reads Waypoint's
    FATAL over its TLS session (both negotiations)."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(60):
        async with e2e_env(
            pg,
            tmp_path,
            tls_mode="require",
            handshake_timeout="1s",
            listener_extra=certs.listener_extra(),
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            env.standin.set_fault("hang", "127.0.0.1")
            for negotiation in ("postgres", "direct"):
                dsn = env.dsn(db, sslmode="require", sslnegotiation=negotiation)
                message = await trio.to_thread.run_sync(_connect_error, dsn)
                assert "Waypoint handshake timed out" in message, message
            env.standin.set_fault(None, "127.0.0.1")
            await env.assert_clean()


class _NoTrioSSLStream:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the session must not use trio.SSLStream for client TLS")


async def test_client_tls_needs_nothing_of_trio_ssl_stream(
    pg: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both negotiations (SSLRequest and direct TLS with ALPN) complete, answer queries and
    are relayed by the epoll engine while ``trio.SSLStream`` cannot even be constructed: the
    TLS state the engine gets is Waypoint's own from the first byte."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(90):
        async with e2e_env(
            pg, tmp_path, tls_mode="require", listener_extra=certs.listener_extra()
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            engine = env.running.contexts[LISTENER].engine
            assert engine is not None
            monkeypatch.setattr(trio, "SSLStream", _NoTrioSSLStream)
            for negotiation in ("postgres", "direct"):
                dsn = env.dsn(db, sslmode="require", sslnegotiation=negotiation)
                ssl_in_use, during, length = await trio.to_thread.run_sync(
                    tls_session, dsn, lambda: engine.active_relays
                )
                assert ssl_in_use
                assert during == 1
                assert length == 20000 * 32
            monkeypatch.undo()
            await env.assert_clean()


async def test_client_tls_over_a_tls_backend_link_uses_the_stream_relay(
    pg15_ssl: PgCluster, tmp_path: Path
) -> None:
    """With TLS on both links the trio stream relay reads and writes Waypoint's client TLS
    stream from two tasks; a result spanning many TLS records arrives whole. (Only PostgreSQL
    15 is started with TLS by the shared fixtures.)"""
    assert pg15_ssl.ca_pem_path is not None
    db = create_app_database(pg15_ssl)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(90):
        async with e2e_env(
            pg15_ssl,
            tmp_path,
            tls_mode="require",
            backend_tls="verify-full",
            listener_extra=certs.listener_extra() + f'\nbackend_ca_file = "{pg15_ssl.ca_pem_path}"',
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            engine = env.running.contexts[LISTENER].engine
            assert engine is not None
            for negotiation in ("postgres", "direct"):
                dsn = env.dsn(db, sslmode="require", sslnegotiation=negotiation)
                ssl_in_use, during, length = await trio.to_thread.run_sync(
                    tls_session, dsn, lambda: engine.active_relays
                )
                assert ssl_in_use
                assert during == 0  # not the engine: the stream relay
                assert length == 20000 * 32
            await env.assert_clean()
