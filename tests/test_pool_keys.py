"""A cancel key of its own for each client of a pooled backend: the client's key reaches the
backend's real key through the cancel registry (memory and Redis), shared state holds neither
secret, and a withdrawn client key cancels nothing."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio
from cancel_support import forwarded, listening_socket
from state_support import KeySpace

from waypoint.pgwire import BackendKeyData, CancelRequest, build_cancel_request
from waypoint.pool import client_cancel_key, secret_length
from waypoint.state import CancelTarget, MemoryStateStore, StateStore, open_state
from waypoint.state.base import seal_backend_secret

TARGET = CancelTarget("pg-main", ("127.0.0.1", 5432), "ann@example.com")


def test_the_client_gets_the_real_pid_and_a_fresh_secret_of_its_protocols_length() -> None:
    real = BackendKeyData(4242, os.urandom(32))
    assert secret_length((3, 0)) == 4 and secret_length((3, 2)) == 32
    seen = set()
    for protocol, length in (((3, 0), 4), ((3, 2), 32)):
        for _ in range(20):
            key, mapped = client_cancel_key(real, protocol, TARGET)
            assert key.pid == 4242
            assert len(key.secret) == length
            assert key.secret != real.secret
            seen.add(key.secret)
            assert (mapped.listener, mapped.backend, mapped.principal) == (
                TARGET.listener,
                TARGET.backend,
                TARGET.principal,
            )
            # Only the client's own secret unseals the backend's.
            assert mapped.backend_secret(4242, key.secret) == real.secret
            assert mapped.backend_secret(4242, os.urandom(length)) != real.secret
            assert mapped.backend_secret(4243, key.secret) != real.secret
    assert len(seen) == 40


def test_the_stored_target_holds_neither_secret() -> None:
    real = BackendKeyData(4242, os.urandom(4))
    key, mapped = client_cancel_key(real, (3, 0), TARGET)
    text = mapped.encode()
    assert real.secret.hex() not in text and key.secret.hex() not in text
    assert CancelTarget.decode(text) == mapped
    # A target without a seal means the client holds the backend's own key.
    assert TARGET.backend_secret(7, b"abcd") == b"abcd"
    assert CancelTarget.decode(TARGET.encode()) == TARGET
    for bad in ('{"l":"a","b":"h:1","p":"x","s":"zz"}', '{"l":"a","b":"h:1","p":"x","s":"01"}'):
        assert CancelTarget.decode(bad) is None, bad
    assert seal_backend_secret(1, b"k" * 4, seal_backend_secret(1, b"k" * 4, b"abcd")) == b"abcd"


@pytest.fixture
async def backend() -> AsyncIterator[trio.socket.SocketType]:
    async with listening_socket() as sock:
        yield sock


async def _two_clients_one_backend(
    a: StateStore, b: StateStore, backend: trio.socket.SocketType
) -> None:
    """Client 1 and then client 2 on one backend: each key reaches the real key while its
    session lasts; client 1's cancels nothing once withdrawn."""
    real = BackendKeyData(31337, os.urandom(32))
    target = CancelTarget("pg-main", ("127.0.0.1", backend.getsockname()[1]), "ann@example.com")
    first, mapped1 = client_cancel_key(real, (3, 2), target)
    await a.register_cancel_key(first.pid, first.secret, mapped1, ttl=60)
    sent = await forwarded(b, CancelRequest(first.pid, first.secret), backend)
    assert sent == build_cancel_request(real.pid, real.secret)
    # Client 1's session ends; its key is withdrawn before the backend is pooled again.
    await a.unregister_cancel_key(first.pid, first.secret)
    second, mapped2 = client_cancel_key(real, (3, 2), target)
    await a.register_cancel_key(second.pid, second.secret, mapped2, ttl=60)
    assert await forwarded(b, CancelRequest(first.pid, first.secret), backend) is None
    sent = await forwarded(b, CancelRequest(second.pid, second.secret), backend)
    assert sent == build_cancel_request(real.pid, real.secret)
    # Nor does the real key itself reach the registry: only Waypoint holds it.
    assert await forwarded(b, CancelRequest(real.pid, real.secret), backend) is None


async def test_memory_registry(backend: trio.socket.SocketType) -> None:
    store = MemoryStateStore()
    await _two_clients_one_backend(store, store, backend)


@pytest.mark.redis
async def test_redis_registry_across_two_instances(
    backend: trio.socket.SocketType, redis_space: KeySpace
) -> None:
    config = redis_space.config()
    async with (
        open_state(config, instance_id="a") as a,
        open_state(config, instance_id="b") as b,
    ):
        await _two_clients_one_backend(a, b, backend)
        client = redis_space.client()
        values = [client.get(k) for k in redis_space.keys("cancel:*")]
        client.close()
        assert len(values) == 1  # the second client's; the first one's is gone
