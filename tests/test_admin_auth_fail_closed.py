"""The admin login fails closed over an unverified TLS backend link: a man in the middle with
any certificate (``backend_tls = "require"`` verifies none) that asks for the password in
cleartext, as MD5, or for SCRAM without channel binding gets neither the password nor an
exchange it could relay. pg8000 on its own answers whatever the server asks."""

from __future__ import annotations

import functools
import ssl
import struct
from pathlib import Path

import pytest
import trio
import trustme
from test_backend_channel_binding import FakeBackend

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.provision.admin import AdminError, AdminPools, admin_auth_refusal

PASSWORD = "the-admin-password-never-on-the-wire"


def _auth_request(code: int, payload: bytes = b"") -> bytes:
    return b"R" + struct.pack("!ii", 8 + len(payload), code) + payload


REQUESTS = {
    "cleartext": _auth_request(3),
    "md5": _auth_request(5, b"salt"),
    "scram-unbound": _auth_request(10, b"SCRAM-SHA-256\0\0"),
}


def _listener(port: int, backend_tls: str, ca_file: Path) -> ListenerConfig:
    return ListenerConfig(
        name="fake",
        listen="127.0.0.1:0",
        backend=f"127.0.0.1:{port}",
        postgres=PostgresListenerConfig(admin_user="waypoint_admin", admin_password=PASSWORD),
        backend_tls=backend_tls,  # type: ignore[arg-type]
        backend_ca_file=str(ca_file),
    )


async def _attempt(tmp_path: Path, backend_tls: str, request: bytes) -> tuple[FakeBackend, str]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fake = FakeBackend(server_context, request)
    error = ""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            pools = AdminPools(
                _listener(port, backend_tls, ca_file),
                limiter=trio.CapacityLimiter(1),
                connect_timeout=10,
            )
            try:
                await pools.connect("postgres")
            except AdminError as exc:
                error = str(exc)
            finally:
                await pools.aclose()
            await fake.done.wait()
            nursery.cancel_scope.cancel()
    return fake, error


@pytest.mark.parametrize("backend_tls", ["require", "verify-ca"])
@pytest.mark.parametrize("kind", sorted(REQUESTS))
async def test_unverified_tls_backend_gets_no_admin_password(
    tmp_path: Path, backend_tls: str, kind: str
) -> None:
    fake, error = await _attempt(tmp_path, backend_tls, REQUESTS[kind])
    assert fake.asked_for_password
    assert "not verified" in error and "verify-full" in error, error
    assert PASSWORD.encode() not in fake.received
    # after the startup message, no PasswordMessage or SASLInitialResponse: at most the
    # Terminate pg8000 sends as it closes
    (startup_length,) = struct.unpack_from("!i", fake.received)
    assert bytes(fake.received[startup_length:]) in (b"", b"X\0\0\0\x04")


async def test_a_verified_backend_keeps_its_own_choice(tmp_path: Path) -> None:
    """Under verify-full the server proved who it is: its cleartext request is answered (the
    operator's pg_hba decides), so fail-closed does not break such setups."""
    fake, _error = await _attempt(tmp_path, "verify-full", REQUESTS["cleartext"])
    assert fake.asked_for_password
    assert PASSWORD.encode() in fake.received


def test_refusal_rules() -> None:
    plus = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    # unverified TLS: only a bound SCRAM exchange may proceed
    assert admin_auth_refusal(10, plus, tls=True, verified=False) is None
    assert admin_auth_refusal(0, [], tls=True, verified=False) is None
    for code, mechanisms in ((3, []), (5, []), (10, ["SCRAM-SHA-256"])):
        assert admin_auth_refusal(code, mechanisms, tls=True, verified=False)
        # a verified server, or a link the operator left in plaintext, decides for itself
        assert admin_auth_refusal(code, mechanisms, tls=True, verified=True) is None
        assert admin_auth_refusal(code, mechanisms, tls=False, verified=False) is None
