"""The static identity provider (docs/configuration.md): identities by source CIDR, from the config.

For development, demos and networks without Tailscale. The first
``[[identity.static]]`` entry whose CIDR contains the peer address wins
(an IPv4-mapped IPv6 peer is unmapped first); no match is refused like an
unknown tailnet peer (28000).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import frozen

from waypoint.config.model import IdentityConfig, StaticIdentity
from waypoint.identity.localapi import BadAddress, PeerNotFound
from waypoint.identity.model import Identity

__all__ = ["StaticEntry", "StaticProvider", "parse_static_grants"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _plain(value: Any, path: str) -> Any:
    """A plain-JSON copy of ``value`` (dicts, lists, str, int, float, bool, None)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: object key {key!r} is not a string")
            out[key] = _plain(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        # tomlkit items subclass these; unwrap to the builtin type
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str(value)
        return None
    raise ValueError(f"{path}: {type(value).__name__} is not a JSON value")


def parse_static_grants(
    entry: StaticIdentity, where: str = "identity.static"
) -> tuple[dict[str, Any], ...]:
    """The entry's rule objects: ``grants`` if given, else ``grants_json`` decoded.

    Raises ValueError with a message naming ``where`` for anything that is not
    a list of JSON objects.
    """
    if entry.grants:
        raw: Any = list(entry.grants)
        source = f"{where}.grants"
    elif entry.grants_json is not None:
        source = f"{where}.grants_json"
        try:
            raw = json.loads(entry.grants_json)
        except ValueError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from None
        if isinstance(raw, dict):
            raise ValueError(f"{source} must be a JSON array of rule objects, not a single object")
    else:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"{source} must be an array of rule objects")
    rules: list[dict[str, Any]] = []
    for index, rule in enumerate(raw):
        if not isinstance(rule, Mapping):
            raise ValueError(f"{source}[{index}] must be an object, not {type(rule).__name__}")
        rules.append(_plain(rule, f"{source}[{index}]"))
    return tuple(rules)


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@frozen
class StaticEntry:
    network: IPNetwork
    identity: Identity


class StaticProvider:
    """:class:`~waypoint.identity.model.IdentityProvider` over a fixed CIDR → Identity table."""

    def __init__(self, entries: Iterable[StaticIdentity]) -> None:
        table: list[StaticEntry] = []
        for index, entry in enumerate(entries):
            where = f"identity.static[{index}]"
            try:
                network: IPNetwork = ipaddress.ip_network(entry.cidr.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{where}.cidr: {exc}") from None
            if (
                isinstance(network, ipaddress.IPv6Network)
                and network.network_address.ipv4_mapped is not None
                and network.prefixlen >= 96
            ):
                # ::ffff:10.0.0.0/104 is written for IPv4 peers, which are unmapped: match as IPv4.
                network = ipaddress.ip_network(
                    f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}"
                )
            if not entry.login:
                raise ValueError(f"{where}.login must not be empty")
            if not entry.node:
                raise ValueError(f"{where}.node must not be empty")
            identity = Identity(
                login=entry.login,
                node=entry.node,
                tags=tuple(entry.tags),
                rules=parse_static_grants(entry, where),
            )
            table.append(StaticEntry(network, identity))
        self.entries: Sequence[StaticEntry] = tuple(table)

    @classmethod
    def from_config(cls, cfg: IdentityConfig) -> StaticProvider:
        return cls(cfg.static)

    def __repr__(self) -> str:
        return f"StaticProvider({len(self.entries)} entries)"

    def lookup(self, host: str) -> Identity | None:
        """The identity for ``host`` (an IP literal), or None. Raises BadAddress for a non-IP."""
        text = host.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        text = text.partition("%")[0]
        try:
            ip = _unmapped(ipaddress.ip_address(text))
        except ValueError:
            raise BadAddress(f"peer host {host!r} is not an IP address") from None
        for entry in self.entries:
            if ip in entry.network:
                return entry.identity
        return None

    async def whois(self, host: str, port: int) -> Identity:
        identity = self.lookup(host)
        if identity is None:
            raise PeerNotFound(
                f"static identity provider: no [[identity.static]] cidr contains {host}"
            )
        return identity

    async def aclose(self) -> None:
        """Nothing to release."""
