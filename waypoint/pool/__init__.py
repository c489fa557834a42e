"""Session pooling per provisioned role (docs/architecture.md#backend-pooling).

``book`` (sans I/O: keys, bounds, eviction), ``wire`` (the reset and the check over a
logged-in backend), ``keys`` (a cancel key of its own for each client), ``handout`` (the
session start a client of a pooled backend is sent).
"""

from waypoint.pool.book import (
    CLOSE_REASONS,
    CloseReason,
    Closing,
    Entry,
    PoolBook,
    PoolKey,
    PoolLimits,
    idle_cap,
)
from waypoint.pool.handout import session_start, updated_parameters
from waypoint.pool.keys import client_cancel_key, secret_length
from waypoint.pool.wire import PooledBackendFailed, RoundTrip, check, reset, round_trip

__all__ = [
    "CLOSE_REASONS",
    "CloseReason",
    "Closing",
    "Entry",
    "PoolBook",
    "PoolKey",
    "PoolLimits",
    "PooledBackendFailed",
    "RoundTrip",
    "check",
    "client_cancel_key",
    "idle_cap",
    "reset",
    "round_trip",
    "secret_length",
    "session_start",
    "updated_parameters",
]
