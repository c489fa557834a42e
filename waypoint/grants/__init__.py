"""Capability rules → effective grants; preset caps; role naming. Pure functions, no I/O."""

from waypoint.grants.evaluate import Evaluation, evaluate, evaluate_parsed, evaluate_rules
from waypoint.grants.model import CustomGrant, EffectiveGrant, Limits, Preset, SchemaPrivilege
from waypoint.grants.presets import PresetCapResult, parse_preset_cap
from waypoint.grants.rules import ParsedRules, RuleError, parse_rules

__all__ = [
    "CustomGrant",
    "EffectiveGrant",
    "Evaluation",
    "Limits",
    "ParsedRules",
    "Preset",
    "PresetCapResult",
    "RuleError",
    "SchemaPrivilege",
    "evaluate",
    "evaluate_parsed",
    "evaluate_rules",
    "parse_preset_cap",
    "parse_rules",
]
