"""Configuration: typed model (``model``) and TOML loading (``load``)."""

from waypoint.config.load import (
    ConfigError,
    ConfigProblem,
    load_config,
    load_config_text,
)
from waypoint.config.model import (
    AdmissionConfig,
    AuditConfig,
    Config,
    DefaultsConfig,
    IdentityConfig,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    PostgresListenerConfig,
    ProvisioningConfig,
    RevalidationConfig,
    StateConfig,
    StaticIdentity,
    split_host_port,
)
from waypoint.config.render import render_config
from waypoint.config.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "AdmissionConfig",
    "AuditConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DefaultsConfig",
    "IdentityConfig",
    "LimitsConfig",
    "ListenerConfig",
    "MetricsConfig",
    "PostgresListenerConfig",
    "ProvisioningConfig",
    "RevalidationConfig",
    "StateConfig",
    "StaticIdentity",
    "format_duration",
    "format_size",
    "load_config",
    "load_config_text",
    "parse_duration",
    "parse_size",
    "render_config",
    "split_host_port",
]
