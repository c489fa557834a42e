"""The benchmark harness cannot rot.

- In the default suite: the report code (rows, ratios, bars, Markdown, JSON, chart) turns
  canned samples into a complete report, in this process, in well under a second.
- ``slow`` (``just slow``): ``python -m bench --quick`` runs end to end (cluster, stand-in,
  ``waypoint run``, PgBouncer when available) and writes a complete report.

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
from bench.report import (  # noqa: E402
    SYSTEMS,
    BurstSample,
    Footprint,
    Results,
    expected_row_ids,
    write_report,
)

HEADINGS = (
    "## Bars",
    "## Relay",
    "## Statement audit",
    "## Connection setup",
    "## Bulk",
    "## Footprint",
    "## Machine",
    "## Versions",
    "## Commands",
)


def canned_results() -> Results:
    """What a quick run with PgBouncer measures, made up: TPS grows with the system's index,
    so every ratio is known."""
    r = Results(meta={"quick": True, "repetitions": 2, "relay_seconds": 3, "date": "d", "host": "h"})
    for i, system in enumerate(SYSTEMS):
        r.relay[system] = {n: [1000.0 * (i + 1) * n, 1000.0 * (i + 1) * n + 2] for n in QUICK.relay_clients}
        r.relay_cpu[system] = {n: [0.5, 0.5] for n in QUICK.relay_clients}
        r.bulk[system] = [100.0 + i, 102.0 + i]
    r.connect = {"direct": [4.0, 6.0], "waypoint": [3.0, 5.0], "waypoint_pooled": [1.0, 1.0]}
    r.connect["pgbouncer"] = [2.0, 2.0]
    r.connect_tps = {"direct": [100.0, 100.0], "waypoint": [90.0, 90.0]}
    r.connect_tps |= {"waypoint_pooled": [300.0, 300.0], "pgbouncer": [400.0, 400.0]}
    r.bursts = [BurstSample("cold", 100, 4, 0, 12.0, 40.0, 55.0, 1.5)]
    r.audit = {"waypoint": {n: [1000.0 * n] for n in QUICK.relay_clients}}
    r.audit["waypoint_audit"] = {n: [900.0 * n] for n in QUICK.relay_clients}
    r.audit_cpu = {s: {n: [0.5] for n in QUICK.relay_clients} for s in r.audit}
    r.audit_records = 1234
    r.footprint = Footprint(QUICK.footprint_sessions, QUICK.footprint_sessions, [], 50_000, 60_000)
    r.command("pgbench -S -n -T 3 -c 32 -j 2")
    return r


def test_report_of_canned_samples_is_complete(tmp_path: Path) -> None:
    md_path, json_path, png = write_report(canned_results(), tmp_path, "canned-quick")
    md = md_path.read_text()
    data = json.loads(json_path.read_text())
    assert png is not None and png.stat().st_size > 1000, data["notes"]
    row_values = data["rows"]
    for row in expected_row_ids(list(SYSTEMS), QUICK.relay_clients, {0: "cold"}):
        assert row_values.get(row) is not None, f"row {row} missing from the report"
    # Medians and ratios of the canned samples: waypoint_tls is system 5, pgbouncer_tls 4.
    assert row_values["relay_tps.direct.c8"] == 8001.0
    assert row_values["relay_ratio.waypoint_tls_to_pgbouncer_tls.c1"] == 5001.0 / 4001.0
    assert row_values["footprint.per_session_kib"] == 10_000 / QUICK.footprint_sessions
    for heading in HEADINGS:
        assert heading in md
    assert md.count("**PASS**") + md.count("**MISS**") + md.count("**n/a**") == len(data["bars"]) == 17
    verdicts = {b["name"]: b["verdict"] for b in data["bars"]}
    assert verdicts["relay TPS Waypoint/PgBouncer, 8 clients"] == "PASS"  # 3/2
    assert verdicts["connect time Waypoint/direct SCRAM"] == "PASS"  # 4/5
    assert verdicts["RSS per idle session (KiB)"] == "PASS"  # 50 KiB
    assert verdicts["connect time Waypoint pooled/direct SCRAM"] == "PASS"  # 1/5
    assert verdicts["relay TPS Waypoint audit on/off, 32 clients"] == "PASS"  # 0.9
    assert row_values["audit_ratio.on_to_off.c8"] == 0.9
    assert verdicts["-C -c 8 TPS Waypoint pooled/direct SCRAM"] == "PASS"  # 3
    assert "pgbench -S -n -T 3 -c 32 -j 2" in md


@pytest.mark.slow
@pytest.mark.pg
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
    for heading in HEADINGS:
        assert heading in md
    assert md.count("**PASS**") + md.count("**MISS**") + md.count("**n/a**") == len(data["bars"]) == 17
    assert f"pgbench -S -n -T {QUICK.relay_seconds} -c 32 -j 2" in md
    assert f"[waypoint_audit] PGUSER=bench PGSSLMODE=disable pgbench -S -n -T {QUICK.audit_seconds} -c 32 -j 2" in md
    assert "| relay TPS Waypoint audit on/off, 32 clients | >= 0.85 |" in md
    assert data["meta"]["waypoint_git"] != "unknown"
    # The benchmark identity's secret never reaches the report.
    assert "PGPASSWORD=***" in md


def test_repetitions_alternate_the_order_of_the_systems() -> None:
    from bench.harness import in_rep_order

    systems = ["direct", "pgbouncer", "waypoint"]
    assert in_rep_order(systems, 0) == systems
    assert in_rep_order(systems, 1) == ["waypoint", "pgbouncer", "direct"]
    assert in_rep_order(systems, 2) == systems
    # Over two repetitions each neighbour runs once before and once after the other.
    first, second = in_rep_order(systems, 0), in_rep_order(systems, 1)
    assert first.index("waypoint") > first.index("pgbouncer")
    assert second.index("waypoint") < second.index("pgbouncer")
