"""contrib/grafana/waypoint.json queries only metrics Waypoint exports (so the dashboard and
waypoint/observability/metrics.py cannot drift apart), and shows what operators watch."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from waypoint.observability.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "contrib" / "grafana" / "waypoint.json"

# PromQL words that are not metric names (aggregations, modifiers, set operators).
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan"}
)
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values`` query) reads:
    every identifier that is not a function call, a keyword, a label in ``{...}``, a grouping
    ``by (...)`` / ``on (...)`` list, a range ``[...]`` or a quoted string."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\b\d[\w.]*", " ", text)  # numbers and durations (5m, 0.95, 1e3)
    label_values = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*\w+\s*\)\s*", text)
    if label_values:
        text = label_values.group(1)
    names = set()
    for m in _IDENT.finditer(text):
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function
        if m.group(0) in _KEYWORDS or text[: m.start()].endswith("$"):
            continue  # a keyword, or a Grafana variable such as $__rate_interval
        names.add(m.group(0))
    return names


def exported_series_names() -> set[str]:
    """Every series name Waypoint's registry exposes (counter → _total, histogram → _bucket,
    _count, _sum; _created is left out: not something to chart)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expression) for every panel target and every query variable."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']}",
                query["query"] if isinstance(query, dict) else query,
            )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (listener) (rate(waypoint_connections_total{listener=~"$listener"}'
            "[$__rate_interval]))",
            {"waypoint_connections_total"},
        ),
        (
            "histogram_quantile(0.95, sum by (le) (rate(waypoint_provision_seconds_bucket[5m])))",
            {"waypoint_provision_seconds_bucket"},
        ),
        ("a_total / on (listener) group_left b", {"a_total", "b"}),
        ('up{job="x", le="waypoint_fake"} offset 5m', {"up"}),
        ("label_values(waypoint_connections_total, listener)", {"waypoint_connections_total"}),
    ],
)
def test_promql_metric_names_finds_the_metrics_and_only_them(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = exported_series_names()
    queried: dict[str, set[str]] = {}
    for where, expr in _queries(_dashboard()):
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            queried.setdefault(name, set()).add(where)
    unknown = {name: sorted(where) for name, where in queried.items() if name not in exported}
    assert unknown == {}, f"the dashboard queries metrics Waypoint does not export: {unknown}"
    # what operators watch is on the dashboard
    for name in (
        "waypoint_connections_active",
        "waypoint_connections_total",
        "waypoint_connections_refused_total",
        "waypoint_sessions_ended_total",
        "waypoint_provision_seconds_bucket",
        "waypoint_relayed_bytes_total",
        "waypoint_reaper_runs_total",
        "waypoint_revalidation_failures_total",
        "waypoint_provision_errors_total",
        "waypoint_backend_login_failures_total",
        "waypoint_cancel_requests_total",
        "waypoint_accept_errors_total",
    ):
        assert name in queried, name


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "waypoint" and dashboard["title"] == "Waypoint"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "listener"}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
