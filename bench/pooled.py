"""Relay ratios pooled over several benchmark runs: ``python -m bench.pooled FILE.json ...``.

Each run's relay section holds, per system and client count, one TPS sample per repetition;
repetition k of Waypoint and of PgBouncer ran next to each other in the same run, so their
quotient is one paired ratio. This prints, per client count, every paired ratio of the runs
given, their geometric mean and median, and in how many pairs Waypoint was ahead: a steadier
figure than one run's medians on a noisy machine. Only ratios within a run are pooled,
never TPS across runs (the machine's speed moves between runs)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def paired_ratios(
    runs: Sequence[Mapping[str, Any]], system: str = "waypoint", baseline: str = "pgbouncer"
) -> dict[str, list[float]]:
    """Per client count (as the JSON keys it: ``"1"``, ``"8"`` ...), the per-repetition
    ``system``/``baseline`` TPS ratios of every run that measured both."""
    out: dict[str, list[float]] = {}
    for run in runs:
        relay = run.get("relay") or {}
        ours, theirs = relay.get(system) or {}, relay.get(baseline) or {}
        for clients, samples in ours.items():
            base = theirs.get(clients) or []
            out.setdefault(clients, []).extend(a / b for a, b in zip(samples, base, strict=False) if b)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def summary(ratios: Sequence[float]) -> tuple[float, float, int]:
    """Geometric mean, median, and how many ratios are at least 1."""
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return geomean, statistics.median(ratios), sum(r >= 1.0 for r in ratios)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pooled", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="the runs' JSON files (bench/results)")
    parser.add_argument("--system", default="waypoint")
    parser.add_argument("--baseline", default="pgbouncer")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    print(f"{args.system}/{args.baseline}, paired per repetition, {len(runs)} run(s)")
    print("| clients | pairs | geometric mean | median | ahead in | ratios |")
    print("|---|---|---|---|---|---|")
    for clients, ratios in paired_ratios(runs, args.system, args.baseline).items():
        if not ratios:
            continue
        geomean, median, ahead = summary(ratios)
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"| {clients} | {len(ratios)} | {geomean:.3f} | {median:.3f} | {ahead} of {len(ratios)} | {listed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
