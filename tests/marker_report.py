"""A pytest plugin for tests/test_markers.py: after collection (and ``-m`` deselection), write
each selected test's id, fixture closure and parameter values as JSON to the file named by
``WAYPOINT_MARKER_REPORT``."""

from __future__ import annotations

import json
import os

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    out = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        params = [] if callspec is None else [str(v) for v in callspec.params.values()]
        out.append(
            {
                "id": item.nodeid,
                "fixtures": sorted(getattr(item, "fixturenames", ())),
                "params": params,
                "markers": sorted({m.name for m in item.iter_markers()}),
            }
        )
    with open(os.environ["WAYPOINT_MARKER_REPORT"], "w") as f:
        json.dump(out, f)
