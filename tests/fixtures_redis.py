"""pytest fixtures for Redis (see tests/state_support.py).

- ``redis_url``: the machine's Redis (``REDIS_URL``), checked reachable (a failure, never a
  skip).
- ``own_redis``: a private ``redis-server`` on a free port that the test may stop, stall
  (SIGSTOP) and restart empty.

Tests using these fixtures (or ``redis_cluster`` / ``redis_sentinel`` and the other fixtures in
``conftest.REDIS_FIXTURES``, or a parameter named for a Redis backend) get the ``redis`` marker
automatically; see tests/conftest.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from state_support import REDIS_URL, OwnRedis, require_redis


@pytest.fixture
def redis_url() -> str:
    require_redis()
    return REDIS_URL


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()
