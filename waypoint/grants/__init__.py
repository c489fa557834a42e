"""Capability rules → effective grants; preset caps; role naming. Pure functions, no I/O."""

from waypoint.grants.model import CustomGrant, EffectiveGrant, Limits, Preset, SchemaPrivilege

__all__ = ["CustomGrant", "EffectiveGrant", "Limits", "Preset", "SchemaPrivilege"]
