"""pytest fixtures for Redis (see tests/state_support.py). No test uses a Redis that happens
to run on the machine: every server is started here (or by tests/redis_ha_support.py) on a
free loopback port, in a temporary directory, with nothing saved, and stopped afterwards.

- ``redis_server``: one private ``redis-server`` for the whole test session, started when the
  first test that needs it runs (a session without Redis tests starts none) and stopped at
  the end of the session. Tests share it, each under a key prefix of its own.
- ``redis_url``: that server's URL.
- ``redis_space``: a :class:`~state_support.KeySpace` on it, a fresh key prefix whose keys
  are deleted after the test.
- ``own_redis``: a private ``redis-server`` of the test's own, which it may stop, stall
  (SIGSTOP) and restart empty.

Tests using these fixtures (or ``redis_cluster`` / ``redis_sentinel`` and the other fixtures in
``conftest.REDIS_FIXTURES``, or a parameter named for a Redis backend) get the ``redis`` marker
automatically; see tests/conftest.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from state_support import KeySpace, OwnRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: OwnRedis) -> str:
    return redis_server.url


@pytest.fixture
def redis_space(redis_url: str) -> Iterator[KeySpace]:
    space = KeySpace(redis_url)
    yield space
    space.delete()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "own-redis")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()
