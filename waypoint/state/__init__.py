"""Shared state: connection slots, cancel-key routing, locks (memory or Redis)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from waypoint.config.model import StateConfig
from waypoint.state.base import (
    LIMIT_TOTAL,
    LIMIT_USER,
    CancelTarget,
    LockToken,
    SlotLease,
    SlotRequest,
    SlotUsage,
    StateStore,
    StateUnavailableError,
    cancel_key_digest,
    limit_listener,
)
from waypoint.state.memory import MemoryStateStore

__all__ = [
    "LIMIT_TOTAL",
    "LIMIT_USER",
    "CancelTarget",
    "LockToken",
    "MemoryStateStore",
    "SlotLease",
    "SlotRequest",
    "SlotUsage",
    "StateStore",
    "StateUnavailableError",
    "cancel_key_digest",
    "limit_listener",
    "open_state",
]

# Worker threads (and pooled Redis connections) per instance.
REDIS_THREADS = 16


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@asynccontextmanager
async def open_state(
    cfg: StateConfig, *, instance_id: str | None = None, op_timeout: float = 2.0
) -> AsyncIterator[StateStore]:
    """Open the configured store for the duration of the block. For Redis, a background
    task (in a nursery owned here) keeps this instance's slot leases alive; leaving the block
    gives back any slots still held and closes the connection pool."""
    if op_timeout <= 0:
        raise ValueError("op_timeout must be positive")
    if cfg.backend == "memory":
        memory = MemoryStateStore()
        try:
            yield memory
        finally:
            await memory.aclose()
        return
    if cfg.backend != "redis":
        raise ValueError(f'[state] backend must be "memory" or "redis", not {cfg.backend!r}')
    if not cfg.url:
        raise ValueError('[state] backend = "redis" needs [state] url')
    if cfg.lease <= 0:
        raise ValueError("[state] lease must be positive")

    import redis  # only when configured

    from waypoint.state.redis_store import KeyLayout, RedisStateStore

    pool = redis.BlockingConnectionPool.from_url(
        cfg.url,
        max_connections=REDIS_THREADS,
        timeout=op_timeout,
        socket_timeout=op_timeout,
        socket_connect_timeout=min(1.0, op_timeout),
    )
    client = redis.Redis(connection_pool=pool)
    store = RedisStateStore(
        client,
        KeyLayout(cfg.key_prefix),
        cfg.lease,
        instance_id or default_instance_id(),
        trio.CapacityLimiter(REDIS_THREADS),
        op_timeout,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_maintenance)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
