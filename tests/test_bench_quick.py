"""The benchmark harness cannot rot: ``python -m bench --quick`` runs end to end (cluster,
stand-in, ``waypoint run``, PgBouncer when available) and writes a complete report.

Asserts the report's presence and sanity (every row there, nonzero throughput, no failed
logins); never its speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import QUICK  # noqa: E402
from bench.report import expected_row_ids  # noqa: E402

pytestmark = pytest.mark.pg


def test_bench_quick_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"bench --quick failed:\n{proc.stderr[-4000:]}"

    mds = sorted(out.glob("*-quick.md"))
    assert len(mds) == 1, f"expected one quick report in {out}, found {mds}"
    md = mds[0].read_text()
    data = json.loads(mds[0].with_suffix(".json").read_text())
    assert mds[0].with_suffix(".png").stat().st_size > 1000

    systems = ["direct", "waypoint", "waypoint_tls"]
    if data["relay"].get("pgbouncer"):
        systems.insert(1, "pgbouncer")
        systems.insert(3, "pgbouncer_tls")  # client_tls_sslmode = require, beside Waypoint + TLS
    else:  # skipped PgBouncer rows must say why
        assert "pgbouncer" in " ".join(data["notes"]).lower()
    row_values = data["rows"]
    for row in expected_row_ids(systems, QUICK.relay_clients, {0: "cold"}):
        assert row in row_values, f"row {row} missing from the report"
        assert row_values[row] is not None, f"row {row} has no value"
    for row, value in row_values.items():
        if row.startswith(("relay_tps.", "audit_tps.", "audit_ratio.", "audit_records", "bulk_mbps.", "connect_ms.")) or row.endswith("_ms"):
            assert value > 0, f"{row} = {value}"
        if row.endswith(".failures"):
            assert value == 0, f"{row}: {value} logins failed; see {mds[0]}"
    assert row_values["footprint.sessions_open"] == QUICK.footprint_sessions
    assert row_values["footprint.rss_after_kib"] > 0

    # The Markdown carries the table, the bars with a verdict each, machine, versions, commands.
    for heading in ("## Bars", "## Relay", "## Statement audit", "## Connection setup", "## Bulk", "## Footprint", "## Machine", "## Versions", "## Commands"):
        assert heading in md
    assert md.count("**PASS**") + md.count("**MISS**") + md.count("**n/a**") == len(data["bars"]) == 17
    assert f"pgbench -S -n -T {QUICK.relay_seconds} -c 32 -j 2" in md
    assert f"[waypoint_audit] PGUSER=bench PGSSLMODE=disable pgbench -S -n -T {QUICK.audit_seconds} -c 32 -j 2" in md
    assert "| relay TPS Waypoint audit on/off, 32 clients | >= 0.85 |" in md
    assert data["meta"]["waypoint_git"] != "unknown"
    # The benchmark identity's secret never reaches the report.
    assert "PGPASSWORD=***" in md
