"""Session pooling per provisioned role (docs/architecture.md#backend-pooling).

``book`` (sans I/O: keys, bounds, eviction), ``service`` (the app's pool: closes what the
book gives up, on time), ``wire`` (the reset and the check over a logged-in backend), ``keys``
(a cancel key of its own for each client), ``handout`` (the session start a client of a pooled
backend is sent).
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
from waypoint.pool.handout import session_start, updated_parameters, with_client_key
from waypoint.pool.keys import client_cancel_key, secret_length
from waypoint.pool.service import BackendPool, Pooled
from waypoint.pool.wire import PooledBackendFailed, RoundTrip, check, reset, round_trip

__all__ = [
    "CLOSE_REASONS",
    "BackendPool",
    "CloseReason",
    "Closing",
    "Entry",
    "PoolBook",
    "PoolKey",
    "PoolLimits",
    "Pooled",
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
    "with_client_key",
]
