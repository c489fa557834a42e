"""The role reaper: drops (or retires) the expired roles and drops the unused groups Waypoint
created (docs/operations.md)."""

from waypoint.reaper.engine import (
    Failure,
    Reaper,
    ReapError,
    ReapReport,
    RoleListing,
    Skipped,
)
from waypoint.reaper.schedule import reap_periodically
from waypoint.reaper.transactions import RoleInfo

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
