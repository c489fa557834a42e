"""Over a TLS backend link, a role with SCRAM keys never hands out its secret unbound: a
backend (or a man in the middle of an unverified link) presenting a certificate that cannot
be bound (Ed25519) and asking for a cleartext password gets nothing, and the login fails
naming the certificate's signature algorithm."""

from __future__ import annotations

import functools
import ssl
import struct
from pathlib import Path

import pytest
import trio
from cert_support import make_certificate

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.pgwire import LoginError, make_scram_verifier
from waypoint.proxy.backend import (
    BackendLogin,
    backend_ssl_context,
    connect_backend,
    login_backend,
)

SECRET = "the-role-secret-never-on-the-wire"
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
CLEARTEXT_REQUEST = b"R" + struct.pack("!ii", 8, 3)


class FakeBackend:
    """A TLS backend that answers any startup message with one authentication request
    (AuthenticationCleartextPassword unless told otherwise) and records every byte it is sent after the handshake."""

    def __init__(self, server_context: ssl.SSLContext, request: bytes = CLEARTEXT_REQUEST) -> None:
        self.context = server_context
        self.request = request
        self.received = bytearray()
        self.asked_for_password = False
        self.done = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(10):
                request = await stream.receive_some(8)
                assert request == SSL_REQUEST, request
                await stream.send_all(b"S")
                tls = trio.SSLStream(stream, self.context, server_side=True)
                await tls.do_handshake()
                while True:
                    data = await tls.receive_some(65536)
                    if not data:
                        break
                    self.received += data
                    if self.asked_for_password:
                        break  # the answer to the password request: hang up
                    if len(self.received) >= 8:
                        self.asked_for_password = True
                        await tls.send_all(self.request)
        except (trio.BrokenResourceError, ssl.SSLError):
            pass  # the client hung up mid-TLS: what it sent so far is recorded
        finally:
            self.done.set()
            await trio.aclose_forcefully(stream)


def _listener(port: int, backend_tls: str, ca_file: Path) -> ListenerConfig:
    return ListenerConfig(
        name="fake",
        listen="127.0.0.1:0",
        backend=f"127.0.0.1:{port}",
        postgres=PostgresListenerConfig(admin_user="admin", admin_password="unused"),
        backend_tls=backend_tls,  # type: ignore[arg-type]
        backend_ca_file=str(ca_file),
    )


@pytest.mark.parametrize(
    ("backend_tls", "message"),
    [
        ("prefer", r"signed with Ed25519 \(1\.3\.101\.112\).*verify-full"),
        ("require", r"signed with Ed25519 \(1\.3\.101\.112\).*verify-full"),
        ("verify-ca", r"signed with Ed25519 \(1\.3\.101\.112\).*verify-full"),
        # verified host: SCRAM may run unbound, but nothing else
        ("verify-full", r"SCRAM is required over this TLS link.*cleartext password"),
    ],
)
async def test_unbindable_certificate_asking_for_cleartext_gets_no_password(
    tmp_path: Path, backend_tls: str, message: str
) -> None:
    ca_file, cert_file, key_file = make_certificate("ed25519").write(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    fake = FakeBackend(server_context)
    _verifier, keys = make_scram_verifier(SECRET)
    login = BackendLogin(
        role="wp_pg_main_alice",
        secret=SECRET,
        scram_keys=keys,
        database="app",
        parameters={},
        protocol=(3, 0),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            config = _listener(port, backend_tls, ca_file)
            conn = await connect_backend(config, backend_ssl_context(config))
            try:
                assert conn.tls
                with pytest.raises(LoginError, match=message):
                    await login_backend(conn, login)
            finally:
                await conn.aclose()
            await fake.done.wait()
            nursery.cancel_scope.cancel()
    assert SECRET.encode() not in fake.received
    assert b"p" not in fake.received[:1]  # no PasswordMessage of any kind
    if backend_tls == "verify-full":
        # the startup message went out, and after the password request nothing more
        assert fake.asked_for_password
        assert fake.received[:4] == struct.pack("!i", len(fake.received))
    else:
        assert fake.received == b""  # refused before a byte of the login was sent
