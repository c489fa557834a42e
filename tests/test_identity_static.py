"""The static identity provider and make_provider."""

from __future__ import annotations

import pytest

from waypoint.config.model import IdentityConfig, StaticIdentity
from waypoint.identity import (
    BadAddress,
    PeerNotFound,
    StaticProvider,
    TailscaleProvider,
    make_provider,
)

RULE = {"backends": {"pg-main": {"pg": {"databases": {"*": {"permissions": ["readonly"]}}}}}}


def provider(*entries: StaticIdentity) -> StaticProvider:
    return StaticProvider(entries)


async def test_first_matching_cidr_wins() -> None:
    p = provider(
        StaticIdentity(
            cidr="127.0.0.2/32", login="alice@example.com", node="alice", grants=(RULE,)
        ),
        StaticIdentity(cidr="127.0.0.0/8", login="everyone@example.com", node="lo"),
    )
    alice = await p.whois("127.0.0.2", 1)
    assert (alice.login, alice.node, alice.rules) == ("alice@example.com", "alice", (RULE,))
    other = await p.whois("127.0.0.3", 1)
    assert (other.login, other.rules) == ("everyone@example.com", ())


async def test_order_decides_not_specificity() -> None:
    p = provider(
        StaticIdentity(cidr="127.0.0.0/8", login="broad@example.com", node="lo"),
        StaticIdentity(cidr="127.0.0.2/32", login="alice@example.com", node="alice"),
    )
    assert (await p.whois("127.0.0.2", 1)).login == "broad@example.com"


async def test_ipv6_cidr_and_ipv4_mapped_peers() -> None:
    p = provider(
        StaticIdentity(cidr="fd7a:115c:a1e0::/48", login="v6@example.com", node="six"),
        StaticIdentity(cidr="100.64.0.0/10", login="v4@example.com", node="four", tags=("tag:ci",)),
    )
    assert (await p.whois("fd7a:115c:a1e0::1", 1)).login == "v6@example.com"
    mapped = await p.whois("::ffff:100.64.0.7", 1)
    assert (mapped.login, mapped.tags) == ("v4@example.com", ("tag:ci",))
    assert (await p.whois("[fd7a:115c:a1e0::2]", 1)).node == "six"


async def test_mapped_cidr_matches_plain_ipv4_peers() -> None:
    p = provider(StaticIdentity(cidr="::ffff:10.0.0.0/104", login="m@example.com", node="m"))
    assert (await p.whois("10.1.2.3", 1)).login == "m@example.com"


async def test_no_match_is_refused_like_unknown_peer() -> None:
    p = provider(StaticIdentity(cidr="10.0.0.0/8", login="a@example.com", node="a"))
    with pytest.raises(PeerNotFound) as info:
        await p.whois("192.168.1.1", 1)
    assert info.value.refusal.sqlstate == "28000"
    assert "not a known Tailscale peer" in info.value.refusal.message
    with pytest.raises(PeerNotFound):
        await p.whois("fd00::1", 1)  # an IPv6 peer never matches an IPv4 network


async def test_non_ip_peer_is_bad_address() -> None:
    p = provider(StaticIdentity(cidr="0.0.0.0/0", login="a@example.com", node="a"))
    with pytest.raises(BadAddress):
        await p.whois("localhost", 1)


async def test_grants_json_is_parsed_when_grants_are_empty() -> None:
    p = provider(
        StaticIdentity(
            cidr="127.0.0.1/32", login="a@example.com", node="a", grants_json='[{"backends": {}}]'
        )
    )
    assert (await p.whois("127.0.0.1", 1)).rules == ({"backends": {}},)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (StaticIdentity(cidr="10.0.0.0/33", login="a", node="a"), "identity.static[0].cidr"),
        (StaticIdentity(cidr="banana", login="a", node="a"), "identity.static[0].cidr"),
        (StaticIdentity(cidr="10.0.0.0/8", login="", node="a"), "login must not be empty"),
        (StaticIdentity(cidr="10.0.0.0/8", login="a", node=""), "node must not be empty"),
        (
            StaticIdentity(cidr="10.0.0.0/8", login="a", node="a", grants_json="[{"),
            "grants_json is not valid JSON",
        ),
        (
            StaticIdentity(cidr="10.0.0.0/8", login="a", node="a", grants_json='{"backends": {}}'),
            "JSON array of rule objects",
        ),
        (
            StaticIdentity(cidr="10.0.0.0/8", login="a", node="a", grants_json='["x"]'),
            "grants_json[0] must be an object",
        ),
        (
            StaticIdentity(cidr="10.0.0.0/8", login="a", node="a", grants=("x",)),
            "grants[0] must be an object",
        ),
    ],
)
def test_bad_static_entries_are_clear_errors(entry: StaticIdentity, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        StaticProvider([entry])
    assert fragment in str(info.value)


def test_make_provider_picks_the_configured_provider() -> None:
    static = make_provider(
        IdentityConfig(
            provider="static",
            static=(StaticIdentity(cidr="127.0.0.0/8", login="a@example.com", node="a"),),
        )
    )
    assert isinstance(static, StaticProvider)
    ts = make_provider(IdentityConfig(socket="/run/ts.sock", timeout=1.5, capability="x/y"))
    assert isinstance(ts, TailscaleProvider)
    assert (ts.client.socket_path, ts.client.timeout, ts.capability) == ("/run/ts.sock", 1.5, "x/y")
