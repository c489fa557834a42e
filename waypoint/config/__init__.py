"""Configuration: typed model (``model``) and TOML loading (``load``)."""

from waypoint.config.model import (
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
)

__all__ = [
    "Config",
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
]
