"""Shared pytest configuration. Fixtures for clusters, Redis, the LocalAPI stand-in etc. live in
modules under tests/ and are imported here.

Markers by construction: a test that requests a PostgreSQL fixture (:data:`PG_FIXTURES`,
directly or through another fixture) gets ``pg``, one that requests a Redis fixture
(:data:`REDIS_FIXTURES`) or has a parameter naming a Redis backend (:data:`REDIS_PARAMS`)
gets ``redis``. So ``-m "not pg and not redis"`` deselects them. And a guard makes a test
that starts a PostgreSQL server (``pgrun.start_server``: the harness's clusters and the demo's)
or opens a Redis connection without the marker fail at that moment, so a test that does it some other way cannot slip through either
(tests/test_markers.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import pytest
import redis.connection
from hypothesis import HealthCheck, settings

from waypoint.demo import pgrun

pytest_plugins = ["fixtures_pg", "fixtures_redis"]

settings.register_profile(
    "ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

#: Fixtures that start or use a throwaway PostgreSQL cluster.
PG_FIXTURES = frozenset({"pg", "pg15", "pg18", "pg15_ssl", "pg_db", "private_pg"})
#: Fixtures that start Redis servers (the session's shared one, or servers of their own).
REDIS_FIXTURES = frozenset(
    {
        "redis_server",
        "redis_url",
        "redis_space",
        "own_redis",
        "redis_cluster",
        "redis_sentinel",
        "cluster_servers",
        "sentinel_servers",
        "tls_servers",
    }
)
#: Parameter values that select a Redis backend (the state suite's ``backend``).
REDIS_PARAMS = frozenset({"redis", "redis-cluster", "redis-sentinel"})


def markers_for(fixturenames: set[str], params: set[str]) -> list[str]:
    """The markers a test with these fixtures (its whole closure) and parameter values needs."""
    out = []
    if fixturenames & PG_FIXTURES:
        out.append("pg")
    if fixturenames & REDIS_FIXTURES or params & REDIS_PARAMS:
        out.append("redis")
    return out


def _params(item: pytest.Item) -> set[str]:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return set()
    return {str(value) for value in callspec.params.values()}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in markers_for(set(getattr(item, "fixturenames", ())), _params(item)):
            item.add_marker(marker)


# -- the guard ---------------------------------------------------------------------------------

_running: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def require_marker(marker: str, what: str) -> None:
    """Fail the running test when it lacks ``marker`` (``pytest.fail`` raises a
    BaseException, so no ``except Exception`` in the code under test swallows it)."""
    item = _running[-1] if _running else None
    if item is not None and item.get_closest_marker(marker) is not None:
        return
    who = item.nodeid if item is not None else "code outside any test"
    pytest.fail(
        f"{who} {what} without the `{marker}` marker: request a fixture of "
        f"tests/conftest.py's {marker.upper()}_FIXTURES or mark it",
        pytrace=False,
    )


def _guarded(marker: str, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        require_marker(marker, what)
        return fn(*args, **kwargs)

    guarded.__wrapped__ = fn  # type: ignore[attr-defined]
    return guarded


pgrun.start_server = _guarded("pg", "starts PostgreSQL", pgrun.start_server)  # type: ignore[assignment]
redis.connection.AbstractConnection.connect = _guarded(  # type: ignore[method-assign]
    "redis", "connects to Redis", redis.connection.AbstractConnection.connect
)
