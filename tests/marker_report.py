"""A pytest plugin for tests/test_markers.py: after collection and ``-m`` deselection, write
each test's id, fixture closure, parameter values, markers and whether it was selected as JSON
to the file named by ``WAYPOINT_MARKER_REPORT``."""

from __future__ import annotations

import json
import os

import pytest

_deselected: list[pytest.Item] = []


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected.extend(items)


def _describe(item: pytest.Item, selected: bool) -> dict[str, object]:
    callspec = getattr(item, "callspec", None)
    params = [] if callspec is None else [str(v) for v in callspec.params.values()]
    return {
        "id": item.nodeid,
        "selected": selected,
        "fixtures": sorted(getattr(item, "fixturenames", ())),
        "params": params,
        "markers": sorted({m.name for m in item.iter_markers()}),
    }


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    out = [_describe(item, True) for item in session.items]
    out += [_describe(item, False) for item in _deselected]
    with open(os.environ["WAYPOINT_MARKER_REPORT"], "w") as f:
        json.dump(out, f)
