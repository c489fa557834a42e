"""bench/pooled.py: relay ratios paired per repetition within each run, pooled over runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.pooled import main, paired_ratios, summary


def _run(waypoint: dict[str, list[float]], pgbouncer: dict[str, list[float]]) -> dict[str, object]:
    return {"relay": {"waypoint": waypoint, "pgbouncer": pgbouncer, "direct": {"1": [9e9]}}}


def test_ratios_pair_repetitions_within_a_run_and_pool_across_runs() -> None:
    fast = _run({"1": [200.0, 300.0], "8": [10.0]}, {"1": [100.0, 300.0], "8": [20.0]})
    # A slower machine in the second run: only its own pairs are compared.
    slow = _run({"1": [9.0], "32": [5.0]}, {"1": [10.0], "32": [4.0]})
    ratios = paired_ratios([fast, slow])
    assert list(ratios) == ["1", "8", "32"]
    assert ratios["1"] == pytest.approx([2.0, 1.0, 0.9])
    assert ratios["8"] == pytest.approx([0.5])
    assert ratios["32"] == pytest.approx([1.25])


def test_summary_is_geometric_mean_median_and_wins() -> None:
    geomean, median, ahead = summary([2.0, 0.5, 1.0])
    assert geomean == pytest.approx(1.0)
    assert median == 1.0
    assert ahead == 2


def test_a_run_without_pgbouncer_adds_no_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with_it = tmp_path / "a.json"
    with_it.write_text(json.dumps(_run({"8": [110.0]}, {"8": [100.0]})))
    without = tmp_path / "b.json"
    without.write_text(json.dumps({"relay": {"waypoint": {"8": [50.0]}}}))
    assert main([str(with_it), str(without)]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 1 | 1.100 | 1.100 | 1 of 1 | 1.10 |" in out
