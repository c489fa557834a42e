"""Caller identity: Tailscale LocalAPI client and the static provider."""

from waypoint.identity.model import TAGGED_DEVICES, Identity, IdentityError, IdentityProvider

__all__ = ["TAGGED_DEVICES", "Identity", "IdentityError", "IdentityProvider"]
