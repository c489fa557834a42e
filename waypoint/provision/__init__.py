"""Provisioning: admin sessions, role lifecycle, groups, raw-SQL validation, dialects (docs/design.md)."""

from waypoint.provision.engine import (
    Credentials,
    DatabaseMissing,
    Provisioner,
    ProvisionError,
)
from waypoint.provision.locks import RoleLease, RoleLockBackend, RoleLockTimeout
from waypoint.provision.rawsql import RawSqlError, render_and_validate

__all__ = [
    "Credentials",
    "DatabaseMissing",
    "ProvisionError",
    "Provisioner",
    "RawSqlError",
    "RoleLease",
    "RoleLockBackend",
    "RoleLockTimeout",
    "render_and_validate",
]
