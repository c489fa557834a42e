"""Caller identity: Tailscale LocalAPI client and the static provider."""

from __future__ import annotations

from waypoint.config.model import IdentityConfig
from waypoint.identity.localapi import (
    BadAddress,
    CertUnavailable,
    LocalAPIClient,
    LocalAPIUnavailable,
    MalformedResponse,
    PeerNotFound,
)
from waypoint.identity.model import TAGGED_DEVICES, Identity, IdentityError, IdentityProvider
from waypoint.identity.static import StaticProvider
from waypoint.identity.tailscale import TailscaleProvider, identity_from_whois

__all__ = [
    "TAGGED_DEVICES",
    "BadAddress",
    "CertUnavailable",
    "Identity",
    "IdentityError",
    "IdentityProvider",
    "LocalAPIClient",
    "LocalAPIUnavailable",
    "MalformedResponse",
    "PeerNotFound",
    "StaticProvider",
    "TailscaleProvider",
    "identity_from_whois",
    "make_provider",
]


def make_provider(cfg: IdentityConfig) -> IdentityProvider:
    """The provider ``[identity] provider`` names. Raises ValueError for a bad static table."""
    if cfg.provider == "static":
        return StaticProvider.from_config(cfg)
    if cfg.provider == "tailscale":
        return TailscaleProvider(cfg)
    raise ValueError(
        f"unknown identity provider {cfg.provider!r} (expected 'tailscale' or 'static')"
    )
