"""The LocalAPI client and TailscaleProvider against the stand-in, over a real unix socket."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from hypothesis import given
from hypothesis import strategies as st
from localapi_standin import LocalAPIStandin, _parse_addr_port, run_standin

from waypoint import errors
from waypoint.config.model import IdentityConfig
from waypoint.identity import (
    BadAddress,
    CertUnavailable,
    LocalAPIClient,
    LocalAPIUnavailable,
    MalformedResponse,
    PeerNotFound,
    TailscaleProvider,
    tailscale,
)
from waypoint.identity.localapi import (
    MAX_CERT_DOMAINS,
    format_go_duration,
    format_whois_addr,
    split_pem_pair,
)

CAP = "redo.com/cap/waypoint"
RULE = {
    "limits": {"max_conns": 10, "max_conn_duration": "1h"},
    "backends": {"pg-main": {"pg": {"databases": {"myapp": {"permissions": ["readwrite"]}}}}},
}


@pytest.fixture
async def standin(tmp_path: Path) -> AsyncIterator[LocalAPIStandin]:
    async with run_standin(tmp_path) as s:
        yield s


def provider_for(standin: LocalAPIStandin, timeout: float = 2.0) -> TailscaleProvider:
    return TailscaleProvider(
        IdentityConfig(socket=standin.socket_path, capability=CAP, timeout=timeout)
    )


# -- successful whois ------------------------------------------------------


async def test_whois_ipv4_peer_gives_login_node_and_rules(standin: LocalAPIStandin) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="alice-laptop", rules=[RULE])
    ident = await provider_for(standin).whois("127.0.0.2", 51234)
    assert ident.login == "alice@example.com"
    assert ident.node == "alice-laptop"
    assert ident.tags == ()
    assert ident.rules == (RULE,)
    assert ident.principal == "alice@example.com"
    assert standin.requests == ["GET /localapi/v0/whois?addr=127.0.0.2%3A51234"]


async def test_whois_ipv6_peer_is_bracketed_and_query_escaped(standin: LocalAPIStandin) -> None:
    standin.set_peer("fd7a:115c:a1e0::1", login="bob@example.com", node="bob-desktop")
    ident = await provider_for(standin).whois("fd7a:115c:a1e0::1", 40000)
    assert (ident.login, ident.node) == ("bob@example.com", "bob-desktop")
    assert standin.requests == [
        "GET /localapi/v0/whois?addr=%5Bfd7a%3A115c%3Aa1e0%3A%3A1%5D%3A40000"
    ]


async def test_ipv4_mapped_peer_is_unmapped_before_asking(standin: LocalAPIStandin) -> None:
    standin.set_peer("100.64.0.1", login="carol@example.com", node="carol")
    ident = await provider_for(standin).whois("::ffff:100.64.0.1", 5432)
    assert ident.login == "carol@example.com"
    assert standin.requests == ["GET /localapi/v0/whois?addr=100.64.0.1%3A5432"]


async def test_small_whois_body_comes_with_content_length(standin: LocalAPIStandin) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="alice-laptop", rules=[RULE])
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    resp = await client.get("/localapi/v0/whois?addr=127.0.0.2%3A1")
    assert resp.status == 200
    assert resp.header(b"content-type") == b"application/json"
    assert resp.header(b"transfer-encoding") is None
    assert int(resp.header(b"content-length") or b"-1") == len(resp.body) <= 2048
    assert resp.body.startswith(b'{\n\t"Node": {') and not resp.body.endswith(b"\n")


async def test_large_whois_body_is_chunked_and_parsed(standin: LocalAPIStandin) -> None:
    big_rules = [
        {
            "backends": {
                f"pg-{i}": {
                    "pg": {
                        "databases": {f"db{j}": {"permissions": ["readonly"]} for j in range(30)}
                    }
                }
            }
        }
        for i in range(5)
    ]
    standin.set_peer("127.0.0.3", login="dave@example.com", node="dave", rules=big_rules)
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    resp = await client.get("/localapi/v0/whois?addr=127.0.0.3%3A1")
    assert resp.header(b"transfer-encoding") == b"chunked"
    assert len(resp.body) > 2048 * 3
    ident = await provider_for(standin).whois("127.0.0.3", 1)
    assert list(ident.rules) == big_rules


async def test_tagged_device_reports_tags_and_node_principal(standin: LocalAPIStandin) -> None:
    standin.set_peer(
        "127.0.0.4", login="tagged-devices", node="ci-runner-7", tags=["tag:ci", "tag:prod"]
    )
    ident = await provider_for(standin).whois("127.0.0.4", 1)
    assert ident.login == "tagged-devices"
    assert ident.tags == ("tag:ci", "tag:prod")
    assert ident.principal == "tagged-devices/ci-runner-7"


async def test_node_name_falls_back_to_first_label_of_name(standin: LocalAPIStandin) -> None:
    standin.set_peer("127.0.0.5", login="erin@example.com", node="erin-box", computed_name=False)
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    raw = await client.whois_raw("127.0.0.5", 1)
    assert raw["Node"]["ComputedName"] == ""
    assert raw["Node"]["Name"] == "erin-box.tail1234.ts.net."
    assert (await provider_for(standin).whois("127.0.0.5", 1)).node == "erin-box"


@pytest.mark.parametrize(
    "cap_map",
    [None, {}, {"other.example/cap/x": [{"a": 1}]}, {CAP: None}, {CAP: []}],
    ids=["null", "empty", "other-capability", "null-capability", "empty-list"],
)
async def test_absent_capability_gives_no_rules(
    standin: LocalAPIStandin, cap_map: dict[str, Any] | None
) -> None:
    standin.set_peer("127.0.0.6", login="frank@example.com", node="frank", cap_map=cap_map)
    ident = await provider_for(standin).whois("127.0.0.6", 1)
    assert ident.rules == ()
    assert ident.login == "frank@example.com"


async def test_grant_change_is_seen_on_next_whois(standin: LocalAPIStandin) -> None:
    provider = provider_for(standin)
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[RULE])
    assert (await provider.whois("127.0.0.2", 1)).rules == (RULE,)
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[])
    assert (await provider.whois("127.0.0.2", 1)).rules == ()
    assert standin.whois_count("127.0.0.2") == 2


async def test_the_same_answer_is_read_once_and_a_changed_one_at_once(
    standin: LocalAPIStandin,
) -> None:
    provider = provider_for(standin)
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[RULE])
    kept = await provider.whois("127.0.0.2", 1)
    assert kept.rules == (RULE,)
    # tailscaled is asked each time; the identity read from the same bytes is the same object
    # (so the grant evaluation can keep its parse of those rules).
    assert (await provider.whois("127.0.0.2", 2)) is kept
    assert standin.whois_count("127.0.0.2") == 2
    # A revocation shows in the very next answer, and so does a removal.
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[])
    assert (await provider.whois("127.0.0.2", 1)).rules == ()
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[RULE])
    assert (await provider.whois("127.0.0.2", 1)) is kept  # the first answer again
    standin.remove_peer("127.0.0.2")
    with pytest.raises(PeerNotFound):
        await provider.whois("127.0.0.2", 1)
    assert standin.whois_count("127.0.0.2") == 5


async def test_the_kept_identities_are_bounded(
    standin: LocalAPIStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tailscale, "PARSED_ANSWERS", 2)
    provider = provider_for(standin)
    for n in range(2, 6):
        standin.set_peer(f"127.0.0.{n}", login=f"u{n}@example.com", node=f"n{n}")
        await provider.whois(f"127.0.0.{n}", 1)
    assert [i.login for _, i in provider._parsed.items()] == ["u4@example.com", "u5@example.com"]


@pytest.mark.parametrize("spare", [0, -1], ids=["at-the-bound", "one-byte-over"])
async def test_only_answers_within_the_size_bound_are_kept(
    standin: LocalAPIStandin, monkeypatch: pytest.MonkeyPatch, spare: int
) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[RULE])
    size = len(await LocalAPIClient(standin.socket_path, timeout=2.0).whois_body("127.0.0.2", 1))
    monkeypatch.setattr(tailscale, "PARSED_ANSWER_MAX_BYTES", size + spare)
    provider = provider_for(standin)
    first = await provider.whois("127.0.0.2", 1)
    again = await provider.whois("127.0.0.2", 1)
    assert first == again
    assert (again is first) == (spare == 0)
    assert len(provider._parsed) == (1 if spare == 0 else 0)


async def test_standin_serialises_a_peer_once_and_anew_after_a_change(
    standin: LocalAPIStandin,
) -> None:
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[RULE])
    before = await client.whois_body("127.0.0.2", 1)
    assert await client.whois_body("127.0.0.2", 1) == before
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[])
    after = await client.whois_body("127.0.0.2", 1)
    assert after != before
    assert json.loads(after)["CapMap"] == {CAP: []}
    assert b"\n\t" in after and not after.endswith(b"\n")  # tailscaled's indented JSON


async def _raw_exchange(path: str, request: bytes, answers: int) -> bytes:
    """Send ``request`` (one or more) on a new connection to the stand-in; read until
    ``answers`` HTTP responses have come, or the end."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(request)
        got = b""
        while got.count(b"HTTP/1.1 ") < answers or not got.endswith(b"}"):
            data = await stream.receive_some(65536)
            if not data:
                break
            got += data
        return got


async def test_standin_sends_a_made_whois_answer_byte_for_byte_as_h11_frames_it(
    standin: LocalAPIStandin,
) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a", rules=[RULE])
    get = b"GET /localapi/v0/whois?addr=127.0.0.2%3A1 HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n"
    # Two requests in one write (pipelined): both answered, on the made bytes.
    made = await _raw_exchange(standin.socket_path, get + get, 2)
    standin.close_after_answer = True  # the answer is then framed by h11 on the spot
    framed = await _raw_exchange(standin.socket_path, get, 1)
    assert framed.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in framed
    assert made == framed + framed
    assert standin.whois_count("127.0.0.2") == 3
    # A client that asks to close gets h11's own framing (it says so).
    standin.close_after_answer = False
    closing = await _raw_exchange(
        standin.socket_path, get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), 1
    )
    assert b"connection: close" in closing.lower()
    assert closing.endswith(framed.partition(b"\r\n\r\n")[2])


# -- faults: each maps to its error type and SQLSTATE -----------------------


async def test_missing_socket_is_unavailable_with_cause(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.sock")
    client = LocalAPIClient(path, timeout=1.0)
    with pytest.raises(LocalAPIUnavailable) as info:
        await client.whois_raw("127.0.0.2", 1)
    assert info.value.refusal.sqlstate == errors.LOGIN_FAILED == "08004"
    assert f"connect to {path} failed" in info.value.refusal.detail
    assert "Errno 2" in info.value.refusal.detail
    assert "tailscaled is unavailable" in info.value.refusal.message


async def test_socket_without_listener_is_unavailable() -> None:
    with tempfile.TemporaryDirectory(prefix="ts-") as d:
        path = os.path.join(d, "dead.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)  # bound, never listening: connect() is refused
        try:
            with pytest.raises(LocalAPIUnavailable) as info:
                await LocalAPIClient(path, timeout=1.0).whois_raw("127.0.0.2", 1)
        finally:
            sock.close()
    assert info.value.refusal.sqlstate == "08004"
    assert "refused" in info.value.refusal.detail.lower()


async def test_hung_tailscaled_times_out_within_the_bound(standin: LocalAPIStandin) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    standin.set_fault("hang", "127.0.0.2")
    provider = provider_for(standin, timeout=0.2)
    # The refusal names the timeout that ended the wait; fail_after only bounds it.
    with trio.fail_after(10), pytest.raises(LocalAPIUnavailable) as info:
        await provider.whois("127.0.0.2", 1)
    assert info.value.refusal.sqlstate == "08004"
    assert "within 0.2s" in info.value.refusal.detail
    # the fault is per peer: another peer still answers
    standin.set_peer("127.0.0.3", login="bob@example.com", node="b")
    assert (await provider.whois("127.0.0.3", 1)).login == "bob@example.com"


async def test_http_500_is_unavailable(standin: LocalAPIStandin) -> None:
    standin.set_fault("status500")
    with pytest.raises(LocalAPIUnavailable) as info:
        await provider_for(standin).whois("127.0.0.2", 1)
    assert info.value.refusal.sqlstate == "08004"
    assert "HTTP 500" in info.value.refusal.detail


async def test_malformed_json_is_malformed_response(standin: LocalAPIStandin) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    standin.set_fault("malformed_json", "127.0.0.2")
    with pytest.raises(MalformedResponse) as info:
        await provider_for(standin).whois("127.0.0.2", 1)
    assert info.value.refusal.sqlstate == "08004"
    assert "not valid JSON" in info.value.refusal.detail


@pytest.mark.parametrize(
    ("ip", "host", "named"),
    [
        ("127.0.0.2", "::ffff:127.0.0.2", "127.0.0.2:7"),  # IPv4-mapped: unmapped
        ("fd7a:115c:a1e0::5", "fd7a:115c:a1e0::5%eth0", "[fd7a:115c:a1e0::5]:7"),
    ],
    ids=["mapped-ipv4", "ipv6-zone"],
)
async def test_a_malformed_answer_names_the_peer_one_way(
    standin: LocalAPIStandin, ip: str, host: str, named: str
) -> None:
    # Not JSON, and JSON of the wrong shape: both messages name the peer as it was asked for
    # (the address tailscaled was sent), not as the caller spelled it.
    standin.set_peer(ip, login="alice@example.com", node="a")
    standin.set_fault("malformed_json", ip)
    with pytest.raises(MalformedResponse) as not_json:
        await provider_for(standin).whois(host, 7)
    assert not_json.value.refusal.detail.startswith(
        f"tailscaled whois {named}: answer is not valid JSON: "
    ), not_json.value.refusal.detail
    standin.set_fault(None, ip)
    standin.set_peer(ip, login="alice@example.com", node="a", cap_map="not a map")
    with pytest.raises(MalformedResponse) as wrong_shape:
        await provider_for(standin).whois(host, 7)
    assert wrong_shape.value.refusal.detail == (
        f"tailscaled whois {named}: whois CapMap is a JSON string, not an object"
    )
    assert standin.whois_count(ip) == 2


@pytest.mark.parametrize("fault", ["close_mid_response", "bad_http"])
async def test_broken_http_is_unavailable(standin: LocalAPIStandin, fault: Any) -> None:
    standin.set_fault(fault)
    with pytest.raises(LocalAPIUnavailable) as info:
        await provider_for(standin).whois("127.0.0.2", 1)
    assert info.value.refusal.sqlstate == "08004"


async def test_unknown_peer_is_refused_as_not_a_tailnet_peer(standin: LocalAPIStandin) -> None:
    with pytest.raises(PeerNotFound) as info:
        await provider_for(standin).whois("127.0.0.9", 1)
    assert info.value.refusal.sqlstate == errors.NOT_AUTHORIZED == "28000"
    assert "not a known Tailscale peer" in info.value.refusal.message
    assert "no match for IP:port" in info.value.refusal.detail


async def test_removed_peer_is_refused(standin: LocalAPIStandin) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    standin.remove_peer("127.0.0.2")
    with pytest.raises(PeerNotFound):
        await provider_for(standin).whois("127.0.0.2", 1)


async def test_tailscaled_400_is_bad_address(standin: LocalAPIStandin) -> None:
    standin.set_fault("status400")
    with pytest.raises(BadAddress) as info:
        await provider_for(standin).whois("127.0.0.2", 1)
    assert info.value.refusal.sqlstate == "28000"
    assert "invalid 'addr' parameter" in info.value.refusal.detail


@pytest.mark.parametrize(("host", "port"), [("not-an-ip", 1), ("", 1), ("127.0.0.1", 70000)])
async def test_invalid_address_is_rejected_before_asking(
    standin: LocalAPIStandin, host: str, port: int
) -> None:
    with pytest.raises(BadAddress) as info:
        await provider_for(standin).whois(host, port)
    assert info.value.refusal.sqlstate == "28000"
    assert standin.requests == []


async def test_oversized_answer_is_refused(standin: LocalAPIStandin) -> None:
    standin.set_peer("127.0.0.2", login="a@example.com", node="a", rules=[{"x": "y" * 5000}])
    client = LocalAPIClient(standin.socket_path, timeout=2.0, max_response=1024)
    with pytest.raises(MalformedResponse) as info:
        await client.whois_raw("127.0.0.2", 1)
    assert "exceeds 1024 bytes" in info.value.refusal.detail


# -- the stand-in enforces tailscaled's request rules -----------------------


async def raw_exchange(path: str, request: bytes) -> bytes:
    with trio.fail_after(2):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(request)
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
            return out


@pytest.mark.parametrize(
    "extra",
    [
        b"Host: localhost\r\n",
        b"Host: local-tailscaled.sock\r\nReferer: http://evil.example/\r\n",
        b"Host: local-tailscaled.sock\r\nOrigin: http://evil.example\r\n",
    ],
    ids=["wrong-host", "referer", "origin"],
)
async def test_standin_rejects_wrong_host_and_browser_headers(
    standin: LocalAPIStandin, extra: bytes
) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    req = (
        b"GET /localapi/v0/whois?addr=127.0.0.2:1 HTTP/1.1\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
    )
    answer = await raw_exchange(standin.socket_path, req)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert answer.endswith(b"\r\n\r\ninvalid localapi request\n")


async def test_standin_answers_bad_and_missing_addr_with_400(standin: LocalAPIStandin) -> None:
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    bad = await client.get("/localapi/v0/whois?addr=banana")
    missing = await client.get("/localapi/v0/whois")
    assert (bad.status, bad.body) == (400, b"invalid 'addr' parameter\n")
    assert (missing.status, missing.body) == (400, b"missing 'addr' parameter\n")
    good = await raw_exchange(
        standin.socket_path,
        b"GET /localapi/v0/whois?addr=127.0.0.9:1 HTTP/1.1\r\nHost: local-tailscaled.sock\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert good.startswith(b"HTTP/1.1 404 ") and good.endswith(b"no match for IP:port\n")


# -- certificates -------------------------------------------------------------


async def test_cert_pair_is_split_by_block_type_and_loads(tmp_path: Path) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    async with run_standin(tmp_path, ca=intermediate) as standin:
        standin.add_cert_domain("waypoint.tail1234.ts.net")
        client = LocalAPIClient(standin.socket_path, timeout=5.0)
        key, chain = await client.cert_pair("waypoint.tail1234.ts.net", min_validity=720 * 3600)
        assert standin.requests == [
            "GET /localapi/v0/cert/waypoint.tail1234.ts.net?type=pair&min_validity=720h"
        ]
    assert key.startswith(b"-----BEGIN EC PRIVATE KEY-----") and key.count(b"-----BEGIN") == 1
    assert chain.count(b"-----BEGIN CERTIFICATE-----") == 2 and b"PRIVATE KEY" not in chain
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "chain.pem").write_bytes(chain)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")  # key matches the leaf


async def test_cert_rate_limit_carries_retry_after(standin: LocalAPIStandin) -> None:
    standin.add_cert_domain("waypoint.tail1234.ts.net")
    standin.set_cert_fault("rate_limited", retry_after="120")
    with pytest.raises(CertUnavailable) as info:
        await LocalAPIClient(standin.socket_path, timeout=2.0).cert_pair(
            "waypoint.tail1234.ts.net", min_validity=None
        )
    assert (info.value.status, info.value.retry_after) == (429, 120.0)
    assert standin.requests == ["GET /localapi/v0/cert/waypoint.tail1234.ts.net?type=pair"]


@pytest.mark.parametrize(("setup", "status"), [("forbidden", 403), ("unknown-domain", 500)])
async def test_cert_refusals_carry_status(
    standin: LocalAPIStandin, setup: str, status: int
) -> None:
    if setup == "forbidden":
        standin.add_cert_domain("waypoint.tail1234.ts.net")
        standin.set_cert_fault("forbidden")
    with pytest.raises(CertUnavailable) as info:
        await LocalAPIClient(standin.socket_path, timeout=2.0).cert_pair(
            "waypoint.tail1234.ts.net", min_validity=3600
        )
    assert info.value.status == status
    assert info.value.retry_after is None
    assert info.value.refusal.sqlstate == "08004"


@pytest.mark.parametrize("domain", ["../../etc/passwd", "", "a b.ts.net", "x" * 300, "é.ts.net"])
async def test_cert_for_invalid_domain_is_refused_without_asking(
    standin: LocalAPIStandin, domain: str
) -> None:
    with pytest.raises(CertUnavailable) as info:
        await LocalAPIClient(standin.socket_path, timeout=2.0).cert_pair(domain, min_validity=None)
    assert info.value.status is None
    assert standin.requests == []


async def test_cert_domains_come_from_the_status_normalised(standin: LocalAPIStandin) -> None:
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    assert await client.cert_domains() == ()  # HTTPS off for the tailnet: CertDomains is null
    standin.add_cert_domain("Waypoint.tail1234.ts.net.")
    standin.add_cert_domain("db.tail1234.ts.net")
    standin.add_cert_domain("bad name.ts.net")  # never a certificate name: dropped
    # In the status's order ("Waypoint…" sorts first in the stand-in), lower case, no dot.
    assert await client.cert_domains() == ("waypoint.tail1234.ts.net", "db.tail1234.ts.net")
    assert standin.requests[-1] == "GET /localapi/v0/status?peers=false"


async def test_cert_domains_are_bounded_and_a_bad_status_is_an_error(
    standin: LocalAPIStandin,
) -> None:
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    for i in range(MAX_CERT_DOMAINS * 3):
        standin.add_cert_domain(f"n{i:03d}.tail1234.ts.net")
    assert len(await client.cert_domains()) == MAX_CERT_DOMAINS
    for bad in ([17], "waypoint.tail1234.ts.net", {"a": 1}):
        standin.status_extra = {"CertDomains": bad}
        with pytest.raises(MalformedResponse):
            await client.cert_domains()


def test_pem_pair_split_does_not_depend_on_order() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("a.ts.net")
    key = leaf.private_key_pem.bytes()
    cert = leaf.cert_chain_pems[0].bytes()
    assert split_pem_pair(cert + key) == (key, cert)
    assert split_pem_pair(key + cert) == (key, cert)


@pytest.mark.parametrize("count", [0, 2])
def test_pem_pair_without_exactly_one_key_is_malformed_and_not_quoted(count: int) -> None:
    leaf = trustme.CA().issue_cert("a.ts.net")
    key = leaf.private_key_pem.bytes()
    body = key * count + leaf.cert_chain_pems[0].bytes()
    with pytest.raises(MalformedResponse) as info:
        split_pem_pair(body)
    assert f"{count} private key block(s)" in str(info.value)
    assert key.splitlines()[1].decode() not in str(info.value)


# -- pure helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (2592000, "720h"), (90, "1m30s"), (1.5, "1.5s"), (3661.25, "1h1m1.25s")],
)
def test_go_duration_formatting(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_go_duration_rejects_nonsense(bad: float) -> None:
    with pytest.raises(ValueError):
        format_go_duration(bad)


@pytest.mark.parametrize(
    ("host", "text"),
    [
        ("100.64.0.1", "100.64.0.1:5"),
        ("fd7a:115c:a1e0::1", "[fd7a:115c:a1e0::1]:5"),
        ("[fd7a:115c:a1e0::1]", "[fd7a:115c:a1e0::1]:5"),
        ("::ffff:100.64.0.1", "100.64.0.1:5"),
        ("fe80::1%eth0", "[fe80::1]:5"),
    ],
)
def test_whois_addr_formatting(host: str, text: str) -> None:
    assert format_whois_addr(host, 5) == text


@given(
    ip=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    port=st.integers(0, 65535),
)
def test_whois_addr_round_trips_through_the_query(ip: Any, port: int) -> None:
    text = format_whois_addr(str(ip), port)
    escaped = urllib.parse.quote(text, safe="")
    decoded = urllib.parse.parse_qs("addr=" + escaped)["addr"][0]
    expected = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert _parse_addr_port(decoded) == expected


def test_client_rejects_nonpositive_timeout() -> None:
    with pytest.raises(ValueError):
        LocalAPIClient("/x", timeout=0)


async def test_concurrent_whois_calls_are_capped(tmp_path: Path) -> None:
    """A burst of lookups never has more than ``max_concurrent`` connections to tailscaled in
    flight (its listen backlog is finite); every lookup still answers."""
    from waypoint.identity.localapi import LocalAPIClient

    async with run_standin(tmp_path) as standin:
        standin.set_peer("127.0.0.2", login="alice@example.com", node="alice-laptop")
        client = LocalAPIClient(standin.socket_path, timeout=10.0, max_concurrent=3)
        in_flight = 0
        peak = 0
        inner = client._get

        async def counting_get(target: str, what: str) -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await trio.sleep(0.01)
                return await inner(target, what)
            finally:
                in_flight -= 1

        client._get = counting_get  # type: ignore[method-assign]
        answers: list[str] = []

        async def one() -> None:
            body = await client.whois_raw("127.0.0.2", 4000)
            answers.append(body["UserProfile"]["LoginName"])

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
        assert answers == ["alice@example.com"] * 40
        assert peak == 3


# -- keep-alive ----------------------------------------------------------------


async def test_sequential_calls_reuse_one_kept_alive_connection(
    standin: LocalAPIStandin,
) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    for _ in range(5):
        body = await client.whois_raw("127.0.0.2", 5000)
        assert body["UserProfile"]["LoginName"] == "alice@example.com"
    assert standin.connections == 1
    await client.aclose()
    await client.whois_raw("127.0.0.2", 5000)  # after aclose: a new connection
    assert standin.connections == 2
    await client.aclose()


async def test_a_kept_connection_closed_while_idle_is_replaced_transparently(
    standin: LocalAPIStandin,
) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    standin.close_after_answer = True
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    for _ in range(3):
        body = await client.whois_raw("127.0.0.2", 5000)
        assert body["UserProfile"]["LoginName"] == "alice@example.com"
        await trio.sleep(0.01)  # let the stand-in's close arrive
    assert standin.connections == 3
    assert len(standin.requests) == 3  # each request sent once: the stale ones never got it
    await client.aclose()


async def test_concurrent_calls_keep_at_most_max_idle_connections(
    standin: LocalAPIStandin,
) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    client = LocalAPIClient(standin.socket_path, timeout=5.0, max_idle=2)
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(client.whois_raw, "127.0.0.2", 5000)
    assert len(client._idle) == 2
    await client.aclose()
    assert client._idle == []


async def test_an_error_answer_does_not_poison_the_kept_connection(
    standin: LocalAPIStandin,
) -> None:
    standin.set_peer("127.0.0.2", login="alice@example.com", node="a")
    client = LocalAPIClient(standin.socket_path, timeout=2.0)
    with pytest.raises(PeerNotFound):
        await client.whois_raw("127.0.0.9", 5000)
    body = await client.whois_raw("127.0.0.2", 5000)
    assert body["UserProfile"]["LoginName"] == "alice@example.com"
    assert standin.connections == 1
    await client.aclose()
