"""The role reaper: drops (or retires) the expired roles and drops the unused groups Waypoint
created (docs/operations.md)."""

from waypoint.reaper.engine import (
    Failure,
    Reaper,
    ReapError,
    ReapReport,
    RoleInfo,
    RoleListing,
    Skipped,
)
from waypoint.reaper.schedule import reap_periodically

__all__ = [
    "Failure",
    "ReapError",
    "ReapReport",
    "Reaper",
    "RoleInfo",
    "RoleListing",
    "Skipped",
    "reap_periodically",
]
