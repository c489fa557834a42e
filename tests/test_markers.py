"""``pytest -m "not pg and not redis"`` starts no PostgreSQL and touches no Redis: collected
that way, no selected test requests a cluster or Redis fixture or has a Redis parameter, while
the full collection has such tests, marked. The guard in tests/conftest.py fails a test that
starts PostgreSQL or connects to Redis without its marker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_FIXTURES, REDIS_FIXTURES, REDIS_PARAMS, markers_for, require_marker

TESTS = Path(__file__).resolve().parent
COLLECT_TIMEOUT = 300


def collect(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    report = tmp_path / "report.json"
    path = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "WAYPOINT_MARKER_REPORT": str(report), "PYTHONPATH": path}
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
            "-p", "marker_report", f"--basetemp={tmp_path / 'inner'}", str(TESTS), *args,
        ],
        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=COLLECT_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    items: list[dict[str, Any]] = json.loads(report.read_text())
    return items


def _needs(item: dict[str, Any]) -> set[str]:
    fixtures = set(item["fixtures"])
    return {
        *(["pg"] if fixtures & PG_FIXTURES else []),
        *(["redis"] if fixtures & REDIS_FIXTURES or set(item["params"]) & REDIS_PARAMS else []),
    }


def test_deselecting_pg_and_redis_leaves_no_test_that_needs_them(tmp_path: Path) -> None:
    everything = collect(tmp_path, "-m", "not pg and not redis")
    by_id = {item["id"]: item for item in everything}
    needing = [item for item in everything if _needs(item)]
    assert len(needing) > 100, "the collection should hold many cluster and Redis tests"
    for item in needing:
        assert _needs(item) <= set(item["markers"]), item
    # The Redis parameter of the state suite, a private cluster:
    state_redis = [i for i in by_id if i.startswith("tests/test_state.py::") and "[redis]" in i]
    assert state_redis and all("redis" in by_id[i]["markers"] for i in state_redis)
    private = [i for i in by_id if i.startswith("tests/test_hostile_clients.py::")]
    assert private and all("pg" in by_id[i]["markers"] for i in private)

    left = [item for item in everything if item["selected"]]
    assert left and len(left) < len(everything)
    offenders = [(item["id"], sorted(_needs(item))) for item in left if _needs(item)]
    assert offenders == []
    assert not [i["id"] for i in left if {"pg", "redis"} & set(i["markers"])]
    memory = [i["id"] for i in left if i["id"].startswith("tests/test_state.py::")]
    assert memory and all("[memory]" in i for i in memory)


def test_markers_follow_fixtures_and_parameters() -> None:
    assert markers_for({"pg_db", "tmp_path"}, set()) == ["pg"]
    assert markers_for({"private_pg"}, {"18"}) == ["pg"]
    assert markers_for({"open_store"}, {"redis-sentinel"}) == ["redis"]
    assert markers_for({"own_redis", "pg"}, set()) == ["pg", "redis"]
    assert markers_for({"tmp_path"}, {"memory"}) == []


def test_the_guard_fails_a_test_without_the_marker() -> None:
    """This test has neither marker: starting PostgreSQL or connecting to Redis fails it."""
    with pytest.raises(pytest.fail.Exception, match="without the `pg` marker"):
        require_marker("pg", "starts PostgreSQL")
    with pytest.raises(pytest.fail.Exception, match="without the `redis` marker"):
        require_marker("redis", "connects to Redis")


@pytest.mark.redis
def test_the_guard_lets_a_marked_test_through() -> None:
    require_marker("redis", "connects to Redis")
