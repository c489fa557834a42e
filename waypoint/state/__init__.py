"""Shared state: connection slots, cancel-key routing, locks (memory or Redis)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from waypoint.state.redis_store import RedisStateStore

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


class _ConnectHook:
    """Forwards redis-py's "new connection" to the store (made before the store exists)."""

    def __init__(self) -> None:
        self.store: RedisStateStore | None = None

    def __call__(self) -> None:
        if self.store is not None:
            self.store.note_new_connection()


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
    if cfg.lease <= 0:
        raise ValueError("[state] lease must be positive")

    from waypoint.state.redis_client import make_client  # only when configured
    from waypoint.state.redis_store import KeyLayout, RedisStateStore

    hook = _ConnectHook()
    client = make_client(cfg, max_connections=REDIS_THREADS, op_timeout=op_timeout, on_connect=hook)
    store = RedisStateStore(
        client,
        KeyLayout(cfg.key_prefix),
        cfg.lease,
        instance_id or default_instance_id(),
        trio.CapacityLimiter(REDIS_THREADS),
        op_timeout,
    )
    hook.store = store
    try:
        await store.warm_up()
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_maintenance)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
