"""The role reaper (SPEC §10): drops the expired roles and unused groups Waypoint created."""

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
