"""Identity from tailscaled: a LocalAPI whois, turned into an :class:`Identity`.

The whois JSON is untrusted input: :func:`identity_from_whois` checks every
field it reads and turns any wrong shape into :class:`MalformedResponse`
(never a KeyError or TypeError). Unknown fields are ignored and ``null`` is
accepted for every list and map (docs/localapi.md).

tailscaled is asked on every connection (a revoked grant or a removed peer shows in the
next answer); what is kept is only the work of reading an answer: the same bytes from
tailscaled are the same :class:`Identity`, so :class:`TailscaleProvider` keeps the identity
read from each of the last :data:`PARSED_ANSWERS` answer bodies and hands out that very
object when the next answer is byte for byte the same (which also lets the grant evaluation
reuse its parse of the identity's rules, :mod:`waypoint.grants.evaluate`). An answer that
differs in any byte is read anew.
"""

from __future__ import annotations

from typing import Any, Final

from waypoint.config.model import IdentityConfig
from waypoint.config.units import json_type
from waypoint.identity.localapi import (
    LocalAPIClient,
    MalformedResponse,
    decode_json_object,
    format_whois_addr,
)
from waypoint.identity.model import Identity
from waypoint.lru import LRU

#: How many whois answer bodies, and how large each at most, have their identity kept.
PARSED_ANSWERS: Final = 512
PARSED_ANSWER_MAX_BYTES: Final = 16 * 1024

__all__ = ["TailscaleProvider", "identity_from_whois"]


def _optional_object(value: Any, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedResponse(f"{what} is a JSON {json_type(value)}, not an object")
    return value


def _node_name(node: dict[str, Any]) -> str:
    computed = node.get("ComputedName")
    if computed is not None and not isinstance(computed, str):
        raise MalformedResponse(
            f"whois Node.ComputedName is a JSON {json_type(computed)}, not a string"
        )
    if computed:
        return computed
    name = node.get("Name")
    if name is not None and not isinstance(name, str):
        raise MalformedResponse(f"whois Node.Name is a JSON {json_type(name)}, not a string")
    label = (name or "").rstrip(".").split(".", 1)[0]
    if not label:
        raise MalformedResponse("whois answer has neither Node.ComputedName nor a Node.Name")
    return label


def _tags(node: dict[str, Any]) -> tuple[str, ...]:
    tags = node.get("Tags")
    if tags is None:
        return ()
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise MalformedResponse("whois Node.Tags is not an array of strings")
    return tuple(tags)


def _rules(body: dict[str, Any], capability: str) -> tuple[dict[str, Any], ...]:
    cap_map = _optional_object(body.get("CapMap"), "whois CapMap")
    if cap_map is None:
        return ()
    rules = cap_map.get(capability)
    if rules is None:
        return ()
    if not isinstance(rules, list):
        raise MalformedResponse(
            f"whois CapMap[{capability!r}] is a JSON {json_type(rules)}, not an array"
        )
    for index, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise MalformedResponse(
                f"whois CapMap[{capability!r}][{index}] is a JSON {json_type(rule)}, not an object"
            )
    return tuple(rules)


def identity_from_whois(body: Any, capability: str) -> Identity:
    """The :class:`Identity` in a decoded whois answer. Raises :class:`MalformedResponse`."""
    if not isinstance(body, dict):
        raise MalformedResponse(f"whois answer is a JSON {json_type(body)}, not an object")
    profile = _optional_object(body.get("UserProfile"), "whois UserProfile")
    if profile is None:
        raise MalformedResponse("whois answer has no UserProfile")
    login = profile.get("LoginName")
    if not isinstance(login, str) or not login:
        raise MalformedResponse("whois UserProfile.LoginName is missing or not a non-empty string")
    node = _optional_object(body.get("Node"), "whois Node")
    if node is None:
        raise MalformedResponse("whois answer has no Node")
    return Identity(
        login=login,
        node=_node_name(node),
        tags=_tags(node),
        rules=_rules(body, capability),
        node_id=stable if isinstance(stable := node.get("StableID"), str) else "",
    )


def _read_whois_answer(body: bytes, host: str, port: int, capability: str) -> Identity:
    """The :class:`Identity` in tailscaled's whois answer ``body`` for the peer at (host,
    port). Raises :class:`MalformedResponse` naming the peer as it was asked for
    (:func:`format_whois_addr`), whether the body is not a JSON object or has the wrong shape,
    so a log names one peer one way."""
    what = f"tailscaled whois {format_whois_addr(host, port)}"
    decoded = decode_json_object(body, what)
    try:
        return identity_from_whois(decoded, capability)
    except MalformedResponse as exc:
        raise MalformedResponse(f"{what}: {exc}") from None


class TailscaleProvider:
    """:class:`~waypoint.identity.model.IdentityProvider` backed by tailscaled's LocalAPI."""

    def __init__(self, cfg: IdentityConfig, *, client: LocalAPIClient | None = None) -> None:
        self.capability = cfg.capability
        self.client = client or LocalAPIClient(cfg.socket, timeout=cfg.timeout)
        #: Answer body (at most :data:`PARSED_ANSWER_MAX_BYTES`) -> the identity read from it.
        self._parsed: LRU[bytes, Identity] = LRU(PARSED_ANSWERS)

    def __repr__(self) -> str:
        return f"TailscaleProvider({self.client!r}, capability={self.capability!r})"

    async def whois(self, host: str, port: int) -> Identity:
        """Who is at (host, port). Raises an :class:`~waypoint.identity.model.IdentityError`
        subclass: PeerNotFound, BadAddress, MalformedResponse or LocalAPIUnavailable."""
        body = await self.client.whois_body(host, port)
        identity = self._parsed.get(body)
        if identity is not None:
            return identity
        identity = _read_whois_answer(body, host, port, self.capability)
        if len(body) <= PARSED_ANSWER_MAX_BYTES:
            self._parsed.put(body, identity)
        return identity

    async def cert_pair(self, domain: str, *, min_validity: float | None) -> tuple[bytes, bytes]:
        """(key_pem, cert_chain_pem) for ``domain`` from tailscaled (see LocalAPIClient.cert_pair)."""
        return await self.client.cert_pair(domain, min_validity=min_validity)

    async def aclose(self) -> None:
        """Close the LocalAPI client's idle keep-alive connections."""
        await self.client.aclose()
