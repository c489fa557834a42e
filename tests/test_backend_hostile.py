"""A hostile backend (or a man in the middle of the backend link) against Waypoint's two
backend clients, the login (``proxy.backend``) and the cancel (``proxy.cancel``), over real
sockets: bytes after the SSLRequest answer, a 1 GiB length word during the login, a message
that does not belong mid-authentication, a second AuthenticationOk. Each is refused with a
clear error, promptly, and the cancel is not sent."""

from __future__ import annotations

import functools
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from cert_support import make_certificate

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.pgwire import LoginError, ProtocolError
from waypoint.proxy.backend import (
    BackendLogin,
    BackendUnavailable,
    backend_ssl_context,
    connect_backend,
    login_backend,
)
from waypoint.proxy.cancel import send_cancel

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
CANCEL_CODE = struct.pack("!i", 80877102)
AUTH_OK = b"R" + struct.pack("!ii", 8, 0)
CLEARTEXT_REQUEST = b"R" + struct.pack("!ii", 8, 3)
READY = b"Z" + struct.pack("!i", 5) + b"I"
DATA_ROW = b"D" + struct.pack("!IH", 6, 0)
#: A length word just under PostgreSQL's own 1 GiB message ceiling (the old login reader's).
NEAR_1_GIB = 0x3FFF0000
#: A fake AuthenticationOk and ReadyForQuery a man in the middle injects in plaintext.
INJECTED = AUTH_OK + READY
PID, SECRET = 4242, b"\x01\x02\x03\x04"
LOGIN = BackendLogin(
    role="wp_pg_main_alice",
    secret="the-role-secret",
    scram_keys=None,
    database="app",
    parameters={},
    protocol=(3, 0),
)

Script = Callable[[trio.SocketStream], Awaitable[None]]


class Hostile:
    """A TCP server running ``script`` on each connection and recording what it was sent."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received = bytearray()
        self.done = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                await self.script(stream)
                while data := await stream.receive_some(65536):
                    self.received += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.done.set()
            await trio.aclose_forcefully(stream)


def _listener(port: int, backend_tls: str, ca_file: Path | None = None) -> ListenerConfig:
    return ListenerConfig(
        name="hostile",
        listen="127.0.0.1:0",
        backend=f"127.0.0.1:{port}",
        postgres=PostgresListenerConfig(admin_user="admin", admin_password="unused"),
        backend_tls=backend_tls,  # type: ignore[arg-type]
        backend_ca_file=str(ca_file) if ca_file else None,
    )


async def _serve(nursery: trio.Nursery, hostile: Hostile) -> int:
    (listener,) = await nursery.start(
        functools.partial(trio.serve_tcp, hostile.handle, 0, host="127.0.0.1")
    )
    return int(listener.socket.getsockname()[1])


def _answer(answer: bytes) -> Script:
    async def script(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(8) == SSL_REQUEST
        await stream.send_all(answer)

    return script


def _after_startup(*messages: bytes) -> Script:
    async def script(stream: trio.SocketStream) -> None:
        (length,) = struct.unpack("!i", await stream.receive_some(4))
        rest = b""
        while len(rest) < length - 4:
            rest += await stream.receive_some(length - 4 - len(rest))
        for message in messages:
            await stream.send_all(message)

    return script


@pytest.mark.parametrize(
    ("answer", "backend_tls"),
    [(b"S" + INJECTED, "require"), (b"N" + INJECTED, "prefer")],
    ids=["S", "N"],
)
async def test_login_refuses_bytes_after_the_ssl_answer(answer: bytes, backend_tls: str) -> None:
    hostile = Hostile(_answer(answer))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = _listener(await _serve(nursery, hostile), backend_tls)
            with pytest.raises(BackendUnavailable, match=r"bytes after its answer .* SSLRequest"):
                await connect_backend(config, backend_ssl_context(config))
            await hostile.done.wait()
            nursery.cancel_scope.cancel()
    assert hostile.received == b""  # no startup message, no login


async def _cancel_against(answer: bytes, backend_tls: str) -> tuple[bool, Hostile]:
    """Waypoint's own cancel, to a server answering SSLRequest with ``answer``."""
    hostile = Hostile(_answer(answer))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = _listener(await _serve(nursery, hostile), backend_tls)
            sent = await send_cancel(
                config.backend_address, PID, SECRET, config, backend_ssl_context(config)
            )
            await hostile.done.wait()
            nursery.cancel_scope.cancel()
    return sent, hostile


@pytest.mark.parametrize(
    ("answer", "backend_tls"),
    [(b"S" + INJECTED, "require"), (b"N" + INJECTED, "prefer")],
    ids=["S", "N"],
)
async def test_cancel_refuses_bytes_after_the_ssl_answer(answer: bytes, backend_tls: str) -> None:
    sent, hostile = await _cancel_against(answer, backend_tls)
    assert not sent
    assert CANCEL_CODE not in hostile.received  # the cancel key never went out


@pytest.mark.parametrize("answer", [b"E", b"X"])
async def test_cancel_refuses_an_answer_that_is_no_answer(answer: bytes) -> None:
    sent, hostile = await _cancel_against(answer, "prefer")
    assert not sent
    assert hostile.received == b""


async def test_cancel_goes_out_after_a_clean_refusal_of_tls_under_prefer() -> None:
    """The control: the same server answering only ``N`` gets the cancel."""
    sent, hostile = await _cancel_against(b"N", "prefer")
    assert sent
    assert hostile.received == struct.pack("!ii", 16, 80877102) + struct.pack("!i", PID) + SECRET


async def _login_against(script: Script) -> tuple[BaseException, Hostile]:
    hostile = Hostile(script)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = _listener(await _serve(nursery, hostile), "disable")
            conn = await connect_backend(config, None)
            try:
                with pytest.raises((LoginError, ProtocolError)) as caught:
                    await login_backend(conn, LOGIN)
            finally:
                await conn.aclose()
            await hostile.done.wait()
            nursery.cancel_scope.cancel()
    return caught.value, hostile


async def test_a_1_gib_length_word_during_login_is_refused_at_once() -> None:
    """The header alone, then silence: the old reader waited for a gigabyte that never came,
    until the handshake deadline."""
    error, _ = await _login_against(_after_startup(b"R" + struct.pack("!I", NEAR_1_GIB)))
    assert isinstance(error, ProtocolError)
    assert "above the limit" in str(error)


async def test_a_session_message_mid_authentication_is_refused() -> None:
    error, _ = await _login_against(_after_startup(CLEARTEXT_REQUEST + DATA_ROW))
    assert "unexpected backend message type b'D'" in str(error)


async def test_a_second_authentication_ok_is_refused() -> None:
    error, _ = await _login_against(_after_startup(AUTH_OK + AUTH_OK + READY))
    assert isinstance(error, LoginError)
    assert "AuthenticationOk after AuthenticationOk" in str(error)


async def test_a_password_request_after_the_login_is_refused() -> None:
    error, hostile = await _login_against(_after_startup(AUTH_OK + CLEARTEXT_REQUEST + READY))
    assert "AuthenticationCleartextPassword after AuthenticationOk" in str(error)
    assert LOGIN.secret.encode() not in hostile.received


async def test_tls_login_refuses_a_1_gib_length_word(tmp_path: Path) -> None:
    """The same bound inside TLS."""
    ca_file, cert_file, key_file = make_certificate("rsa-pss").write(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)

    async def script(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(8) == SSL_REQUEST
        await stream.send_all(b"S")
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await tls.do_handshake()
        await tls.receive_some(65536)  # the startup message
        await tls.send_all(b"R" + struct.pack("!I", NEAR_1_GIB))
        await tls.receive_some(65536)

    hostile = Hostile(script)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = _listener(await _serve(nursery, hostile), "require", ca_file)
            conn = await connect_backend(config, backend_ssl_context(config))
            try:
                assert conn.tls
                with pytest.raises(ProtocolError, match="above the limit"):
                    await login_backend(conn, LOGIN)
            finally:
                await conn.aclose()
            nursery.cancel_scope.cancel()
