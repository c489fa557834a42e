"""ClientTLS certificate choice (SNI), the Tailscale certificate cache, its renewal, the fallback
to a still-valid cached certificate and the back-off after a failed fetch; ClientHello peeking."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import trustme

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.identity.localapi import CertUnavailable
from waypoint.proxy import tls as tls_mod
from waypoint.proxy.tls import ClientTLS


def _listener(
    cert: Path | None = None, key: Path | None = None, *, tailscale: bool = True
) -> ListenerConfig:
    return ListenerConfig(
        name="pg-main",
        listen="127.0.0.1:0",
        backend="127.0.0.1:5432",
        postgres=PostgresListenerConfig(admin_user="a", admin_password="p"),
        use_tailscale_tls=tailscale,
        cert_file=str(cert) if cert else None,
        key_file=str(key) if key else None,
    )


class FakeFetcher:
    def __init__(self, ca: trustme.CA, days: int) -> None:
        self.ca = ca
        self.days = days
        self.calls: list[str] = []
        self.fail: Exception | None = None

    async def __call__(self, domain: str) -> tuple[bytes, bytes]:
        self.calls.append(domain)
        if self.fail is not None:
            raise self.fail
        now = dt.datetime.now(dt.UTC)
        leaf = self.ca.issue_cert(
            domain,
            not_before=now - dt.timedelta(hours=1),
            not_after=now + dt.timedelta(days=self.days),
        )
        return leaf.private_key_pem.bytes(), b"".join(b.bytes() for b in leaf.cert_chain_pems)


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tailscale_certificate_is_fetched_once_and_cached(ca: trustme.CA) -> None:
    fetch = FakeFetcher(ca, days=90)
    tls = ClientTLS(_listener(), fetch_cert=fetch)
    first = await tls.context_for("node.tail1234.ts.net")
    second = await tls.context_for("node.tail1234.ts.net")
    assert first is not None and first is second
    assert fetch.calls == ["node.tail1234.ts.net"]


async def test_certificate_close_to_expiry_is_renewed(ca: trustme.CA) -> None:
    fetch = FakeFetcher(ca, days=90)
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, clock=clock)
    await tls.context_for("n.ts.net")
    clock.now += 80 * 24 * 3600  # 10 days left: inside RENEW_BEFORE
    await tls.context_for("n.ts.net")
    assert fetch.calls == ["n.ts.net", "n.ts.net"]


async def test_failed_renewal_falls_back_to_the_still_valid_cached_certificate(
    ca: trustme.CA,
) -> None:
    fetch = FakeFetcher(ca, days=90)
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, clock=clock)
    cached = await tls.context_for("n.ts.net")
    clock.now += 80 * 24 * 3600
    fetch.fail = OSError("tailscaled down")
    assert await tls.context_for("n.ts.net") is cached


async def test_failed_fetch_backs_off_before_asking_again(ca: trustme.CA) -> None:
    fetch = FakeFetcher(ca, days=90)
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, clock=clock)
    fetch.fail = CertUnavailable("429 rate limited", status=429, retry_after=120.0)
    assert await tls.context_for("n.ts.net") is None
    assert await tls.context_for("n.ts.net") is None
    assert len(fetch.calls) == 1
    clock.now += tls_mod.FETCH_BACKOFF + 1  # still inside Retry-After (120 s)
    assert await tls.context_for("n.ts.net") is None
    assert len(fetch.calls) == 1
    clock.now += 120
    fetch.fail = None
    assert await tls.context_for("n.ts.net") is not None
    assert len(fetch.calls) == 2


async def test_file_certificate_serves_its_names_and_no_sni(ca: trustme.CA, tmp_path: Path) -> None:
    leaf = ca.issue_cert("db.example.com")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    fetch = FakeFetcher(ca, days=90)
    tls = ClientTLS(_listener(cert, key), fetch_cert=fetch)
    file_ctx = await tls.context_for(None)
    assert file_ctx is not None
    assert await tls.context_for("db.example.com") is file_ctx
    assert fetch.calls == []
    other = await tls.context_for("node.ts.net")
    assert other is not None and other is not file_ctx
    assert fetch.calls == ["node.ts.net"]


def test_client_hello_sni_and_alpn_are_read() -> None:
    import ssl

    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="node.tail1234.ts.net")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert tls_mod.client_hello_length(hello) == len(hello)
    assert tls_mod.client_hello_length(hello[:-1]) is None
    info = tls_mod.parse_client_hello(hello)
    assert info.server_name == "node.tail1234.ts.net"
    assert info.alpn == ("postgresql",)
