"""ClientTLS certificate choice (SNI), the Tailscale certificate cache, its renewal, the fallback
to a still-valid cached certificate and the back-off after a failed fetch; certificates only for
the node's own names, so that server names sent before any identity check grow neither memory
nor requests to tailscaled; ClientHello peeking."""

from __future__ import annotations

import datetime as dt
import gc
import tracemalloc
from pathlib import Path

import pytest
import trio
import trustme
from localapi_standin import run_standin

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.identity.localapi import CertUnavailable, LocalAPIClient
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


OWN_NAMES = ["node.tail1234.ts.net", "n.ts.net", "other.ts.net"]


class FakeFetcher:
    def __init__(self, ca: trustme.CA, days: int) -> None:
        self.ca = ca
        self.days = days
        self.calls: list[str] = []
        self.fail: Exception | None = None
        self.names = list(OWN_NAMES)
        self.name_calls = 0

    async def domains(self) -> list[str]:
        self.name_calls += 1
        return list(self.names)

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
    tls = ClientTLS(_listener(), fetch_cert=fetch, cert_domains=fetch.domains)
    first = await tls.context_for("node.tail1234.ts.net")
    second = await tls.context_for("node.tail1234.ts.net")
    assert first is not None and first is second
    assert fetch.calls == ["node.tail1234.ts.net"]


async def test_certificate_close_to_expiry_is_renewed(ca: trustme.CA) -> None:
    fetch = FakeFetcher(ca, days=90)
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, cert_domains=fetch.domains, clock=clock)
    await tls.context_for("n.ts.net")
    clock.now += 80 * 24 * 3600  # 10 days left: inside RENEW_BEFORE
    await tls.context_for("n.ts.net")
    assert fetch.calls == ["n.ts.net", "n.ts.net"]


async def test_failed_renewal_falls_back_to_the_still_valid_cached_certificate(
    ca: trustme.CA,
) -> None:
    fetch = FakeFetcher(ca, days=90)
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, cert_domains=fetch.domains, clock=clock)
    cached = await tls.context_for("n.ts.net")
    clock.now += 80 * 24 * 3600
    fetch.fail = OSError("tailscaled down")
    assert await tls.context_for("n.ts.net") is cached


async def test_failed_fetch_backs_off_before_asking_again(ca: trustme.CA) -> None:
    fetch = FakeFetcher(ca, days=90)
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, cert_domains=fetch.domains, clock=clock)
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
    tls = ClientTLS(_listener(cert, key), fetch_cert=fetch, cert_domains=fetch.domains)
    file_ctx = await tls.context_for(None)
    assert file_ctx is not None
    assert await tls.context_for("db.example.com") is file_ctx
    assert fetch.calls == []
    other = await tls.context_for("other.ts.net")
    assert other is not None and other is not file_ctx
    assert fetch.calls == ["other.ts.net"]


async def test_10000_unknown_server_names_grow_neither_memory_nor_tailscaled_requests(
    tmp_path: Path,
) -> None:
    """Server names arrive before any identity check. 10,000 distinct ones, tailnet-looking
    or not, make no certificate request and leave no per-name entry; the node's status is
    asked once. The node's own name still gets its certificate, fetched once."""
    own = "waypoint.tail1234.ts.net"
    async with run_standin(tmp_path) as standin:
        standin.add_cert_domain(own)
        client = LocalAPIClient(standin.socket_path, timeout=5.0)

        async def fetch(domain: str) -> tuple[bytes, bytes]:
            return await client.cert_pair(domain, min_validity=tls_mod.MIN_VALIDITY)

        clock = Clock()
        tls = ClientTLS(
            _listener(), fetch_cert=fetch, cert_domains=client.cert_domains, clock=clock
        )
        with trio.fail_after(60):
            assert await tls.context_for("warm-up.tail1234.ts.net") is None
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for i in range(10_000):
                    name = f"n{i}.tail1234.ts.net" if i % 2 else f"x{i}.attacker.example"
                    assert await tls.context_for(name) is None
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert standin.cert_count() == 0
            assert standin.status_count() == 1
            assert (tls._ts_cache, tls._ts_locks, tls._ts_backoff) == ({}, {}, {})
            # The old code kept about 500 bytes per name (5 MB here).
            assert grown < 256 * 1024, grown

            ctx = await tls.context_for(own)
            assert ctx is not None and await tls.context_for(own) is ctx
            assert standin.cert_count() == 1
            assert set(tls._ts_cache) == {own} and set(tls._ts_locks) == {own}
        await client.aclose()


async def test_the_nodes_names_are_asked_once_per_interval_however_many_names_arrive(
    ca: trustme.CA,
) -> None:
    fetch = FakeFetcher(ca, days=90)
    fetch.names = ["node.tail1234.ts.net"]
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, cert_domains=fetch.domains, clock=clock)
    start = clock.now
    for i in range(3000):
        assert await tls.context_for(f"n{i}.tail1234.ts.net") is None
        clock.now += 0.1  # 300 s in all
    assert fetch.calls == []
    elapsed = clock.now - start
    assert fetch.name_calls <= 1 + elapsed / tls_mod.NAMES_REFRESH
    # A name the node gains is served after the next refresh; one it loses is forgotten.
    assert await tls.context_for("node.tail1234.ts.net") is not None
    fetch.names = ["new.tail1234.ts.net"]
    assert await tls.context_for("new.tail1234.ts.net") is None
    clock.now += tls_mod.NAMES_REFRESH
    assert await tls.context_for("new.tail1234.ts.net") is not None
    assert set(tls._ts_cache) == {"new.tail1234.ts.net"}
    assert set(tls._ts_locks) == {"new.tail1234.ts.net"}
    assert fetch.calls == ["node.tail1234.ts.net", "new.tail1234.ts.net"]


async def test_a_failed_status_request_keeps_the_known_names_and_backs_off(
    ca: trustme.CA,
) -> None:
    fetch = FakeFetcher(ca, days=90)
    clock = Clock()
    tls = ClientTLS(_listener(), fetch_cert=fetch, cert_domains=fetch.domains, clock=clock)
    assert await tls.own_names() == frozenset(OWN_NAMES)
    clock.now += tls_mod.NAMES_REFRESH

    async def failing() -> list[str]:
        fetch.name_calls += 1
        raise OSError("tailscaled down")

    tls._cert_domains = failing
    calls = fetch.name_calls
    for _ in range(100):
        assert await tls.own_names() == frozenset(OWN_NAMES)
    assert fetch.name_calls == calls + 1
    clock.now += tls_mod.FETCH_BACKOFF
    await tls.own_names()
    assert fetch.name_calls == calls + 2


def test_tailscale_certificates_need_the_nodes_names(ca: trustme.CA) -> None:
    with pytest.raises(ValueError, match="cert_domains"):
        ClientTLS(_listener(), fetch_cert=FakeFetcher(ca, days=90))


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
