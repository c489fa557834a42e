"""Benchmark results: the raw samples, the medians and ratios, the bars (PASS/MISS), and the
report (Markdown + JSON + a PNG chart)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

SYSTEMS = ("direct", "pgbouncer", "waypoint", "pgbouncer_tls", "waypoint_tls")
SYSTEM_LABELS = {
    "direct": "direct",
    "pgbouncer": "PgBouncer (session)",
    "waypoint": "Waypoint",
    "pgbouncer_tls": "PgBouncer + client TLS",
    "waypoint_tls": "Waypoint + client TLS",
    "waypoint_pooled": "Waypoint, pooled",
}
#: The connect section's rows (bench/README.md).
CONNECT_LABELS = {
    "direct": "direct SCRAM login",
    "waypoint": "Waypoint, pool = false (whois + cached role + backend SCRAM login)",
    "waypoint_pooled": "Waypoint, pooled (whois + a pooled backend: check, cancel key)",
    "pgbouncer": "PgBouncer, pooled session mode (no authentication of the caller)",
}


@attrs.define
class BurstSample:
    label: str  # "cold" (first logins of each identity: provisioning included) or "warm"
    connections: int
    identities: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    wall_s: float
    errors: list[str] = attrs.field(factory=list)


@attrs.define
class Footprint:
    sessions_wanted: int
    sessions_open: int
    errors: list[str]
    rss_before_kib: int
    rss_after_kib: int

    @property
    def per_session_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / max(1, self.sessions_open)


@attrs.define
class Results:
    """Everything one run measured. Sample lists hold one value per repetition."""

    meta: dict[str, Any] = attrs.field(factory=dict)
    relay: dict[str, dict[int, list[float]]] = attrs.field(factory=dict)  # system -> clients -> TPS
    relay_cpu: dict[str, dict[int, list[float]]] = attrs.field(factory=dict)  # proxy CPU s/s
    connect: dict[str, list[float]] = attrs.field(factory=dict)  # system -> avg connection ms
    connect_tps: dict[str, list[float]] = attrs.field(factory=dict)  # system -> TPS, -C -c 8
    bursts: list[BurstSample] = attrs.field(factory=list)
    bulk: dict[str, list[float]] = attrs.field(factory=dict)  # system -> MB/s
    footprint: Footprint | None = None
    #: Waypoint with [audit] on ("waypoint_audit") and off ("waypoint"): clients -> TPS.
    audit: dict[str, dict[int, list[float]]] = attrs.field(factory=dict)
    audit_cpu: dict[str, dict[int, list[float]]] = attrs.field(factory=dict)
    audit_records: int | None = None
    commands: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def command(self, text: str) -> None:
        if text not in self.commands:
            self.commands.append(text)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


@attrs.frozen
class Bar:
    name: str
    target: str
    value: float | None
    passed: bool | None  # None: not measurable in this run

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


def _bar(name: str, target: str, value: float | None, ok: bool | None) -> Bar:
    return Bar(name, target, value, None if value is None else ok)


def bars(r: Results) -> list[Bar]:
    """The bars (bench/README.md), each with its measured value and verdict."""
    out: list[Bar] = []
    for n in sorted(r.relay.get("waypoint", {})):
        v = ratio(median(r.relay["waypoint"][n]), median(r.relay.get("pgbouncer", {}).get(n, [])))
        out.append(_bar(f"relay TPS Waypoint/PgBouncer, {n} clients", ">= 1.0", v, v is not None and v >= 1.0))
    for n in (1, 8, 32):
        v = ratio(
            median(r.relay.get("waypoint_tls", {}).get(n, [])),
            median(r.relay.get("pgbouncer_tls", {}).get(n, [])),
        )
        out.append(_bar(f"relay TPS Waypoint+TLS/PgBouncer+TLS, {n} clients", ">= 1.0", v, v is not None and v >= 1.0))
    for n in (1, 8, 32):
        v = audit_ratio(r, n)
        out.append(_bar(f"relay TPS Waypoint audit on/off, {n} clients", ">= 0.85", v, v is not None and v >= 0.85))
    v = ratio(median(r.relay.get("waypoint", {}).get(8, [])), median(r.relay.get("direct", {}).get(8, [])))
    out.append(_bar("relay TPS Waypoint/direct, 8 clients", ">= 0.7", v, v is not None and v >= 0.7))
    v = ratio(median(r.connect.get("waypoint", [])), median(r.connect.get("direct", [])))
    out.append(_bar("connect time Waypoint/direct SCRAM", "<= 1.0", v, v is not None and v <= 1.0))
    v = ratio(median(r.connect.get("waypoint_pooled", [])), median(r.connect.get("direct", [])))
    out.append(_bar("connect time Waypoint pooled/direct SCRAM", "<= 0.3", v, v is not None and v <= 0.3))
    v = ratio(median(r.connect_tps.get("waypoint_pooled", [])), median(r.connect_tps.get("direct", [])))
    out.append(_bar("-C -c 8 TPS Waypoint pooled/direct SCRAM", ">= 2.0", v, v is not None and v >= 2.0))
    if r.bursts:
        fails = float(sum(b.failures for b in r.bursts))
        conns = r.bursts[0].connections
        ids = r.bursts[0].identities
        out.append(_bar(f"{conns} concurrent connections from {ids} identities: failures (all bursts)", "0", fails, fails == 0))
    else:
        out.append(Bar("concurrent connections: failures", "0", None, None))
    v = ratio(median(r.bulk.get("waypoint", [])), median(r.bulk.get("direct", [])))
    out.append(_bar("bulk COPY MB/s Waypoint/direct", ">= 0.8", v, v is not None and v >= 0.8))
    v = ratio(median(r.bulk.get("waypoint_tls", [])), median(r.bulk.get("waypoint", [])))
    out.append(_bar("bulk COPY MB/s Waypoint+TLS/Waypoint", ">= 0.9", v, v is not None and v >= 0.9))
    fp = r.footprint
    v = fp.per_session_kib if fp is not None and fp.sessions_open else None
    out.append(_bar("RSS per idle session (KiB)", "<= 100", v, v is not None and v <= 100))
    return out


def audit_ratio(r: Results, clients: int) -> float | None:
    """Waypoint's TPS with the statement audit on over off (medians of the same run)."""
    return ratio(median(r.audit.get("waypoint_audit", {}).get(clients, [])), median(r.audit.get("waypoint", {}).get(clients, [])))


def _cpu_per_txn(r: Results, system: str, clients: int, audit: bool = False) -> float | None:
    """Median over repetitions of the proxy's CPU time per transaction, in microseconds."""
    cpu = (r.audit_cpu if audit else r.relay_cpu).get(system, {}).get(clients, [])
    tps = (r.audit if audit else r.relay).get(system, {}).get(clients, [])
    per = [c / t * 1e6 for c, t in zip(cpu, tps, strict=False) if t > 0]
    return median(per)


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None else format(v, spec)


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def rows(r: Results) -> dict[str, float | None]:
    """The report's figures by a stable id (what the quick test checks)."""
    out: dict[str, float | None] = {}
    for system, by_clients in r.relay.items():
        for n, samples in by_clients.items():
            out[f"relay_tps.{system}.c{n}"] = median(samples)
    for n, samples in r.relay.get("waypoint_tls", {}).items():
        out[f"relay_ratio.waypoint_tls_to_pgbouncer_tls.c{n}"] = ratio(
            median(samples), median(r.relay.get("pgbouncer_tls", {}).get(n, []))
        )
    for system, by_clients in r.audit.items():
        for n, samples in by_clients.items():
            out[f"audit_tps.{system}.c{n}"] = median(samples)
    for n in r.audit.get("waypoint_audit", {}):
        out[f"audit_ratio.on_to_off.c{n}"] = audit_ratio(r, n)
    if r.audit_records is not None:
        out["audit_records"] = float(r.audit_records)
    for system, samples in r.connect.items():
        out[f"connect_ms.{system}"] = median(samples)
    for system, samples in r.connect_tps.items():
        out[f"connect_tps.{system}.c8"] = median(samples)
    for i, b in enumerate(r.bursts):
        out[f"burst.{i}.{b.label}.p50_ms"] = b.p50_ms
        out[f"burst.{i}.{b.label}.p99_ms"] = b.p99_ms
        out[f"burst.{i}.{b.label}.failures"] = float(b.failures)
    for system, samples in r.bulk.items():
        out[f"bulk_mbps.{system}"] = median(samples)
    if r.footprint is not None:
        out["footprint.sessions_open"] = float(r.footprint.sessions_open)
        out["footprint.rss_before_kib"] = float(r.footprint.rss_before_kib)
        out["footprint.rss_after_kib"] = float(r.footprint.rss_after_kib)
        out["footprint.per_session_kib"] = r.footprint.per_session_kib
    return out


def _connect_rows(figures: Mapping[str, list[float]], spec: str) -> list[str]:
    """The connect section's table rows (median, then every sample), and a blank line."""
    rows = [
        f"| {label} | {_fmt(median(figures[s]), spec)} | " + ", ".join(format(x, spec) for x in figures[s]) + " |"
        for s, label in CONNECT_LABELS.items()
        if s in figures
    ]
    return [*rows, ""]


def render_markdown(r: Results, chart_name: str | None) -> str:
    m = r.meta
    reps = m.get("repetitions", "?")
    lines: list[str] = [
        f"# Waypoint benchmark: {m.get('date', '?')} on {m.get('host', '?')}"
        + (" (quick mode: a smoke run, not figures)" if m.get("quick") else ""),
        "",
        f"Medians of {reps} interleaved repetition(s) per cell (systems run A B C D, then D C B A, then A B C D …).",
        "",
        "## Bars (the deciding relay ratio is Waypoint/PgBouncer; see bench/README.md)",
        "",
        "| bar | target | measured | verdict |",
        "|---|---|---|---|",
    ]
    for b in bars(r):
        val = "—" if b.value is None else (f"{b.value:.2f}" if b.value < 1000 else f"{b.value:,.0f}")
        lines.append(f"| {b.name} | {b.target} | {val} | **{b.verdict}** |")

    clients = sorted({n for by in r.relay.values() for n in by})
    present = [s for s in SYSTEMS if s in r.relay]
    lines += [
        "",
        f"## Relay: `pgbench -S -T {m.get('relay_seconds', '?')} -j 2`, TPS",
        "",
        "| clients | " + " | ".join(SYSTEM_LABELS[s] for s in present)
        + " | Waypoint/PgBouncer | Waypoint TLS/PgBouncer TLS | Waypoint/direct | Waypoint TLS/direct"
        + " | CPU µs/transaction: Waypoint | PgBouncer | Waypoint TLS | PgBouncer TLS |",
        "|---|" + "---|" * (len(present) + 8),
    ]
    for n in clients:
        med = {s: median(r.relay[s].get(n, [])) for s in present}
        cpu_us = {s: _cpu_per_txn(r, s, n) for s in ("waypoint", "pgbouncer", "waypoint_tls", "pgbouncer_tls")}
        lines.append(
            f"| {n} | " + " | ".join(_fmt(med[s]) for s in present)
            + f" | {_x(ratio(med.get('waypoint'), med.get('pgbouncer')))}"
            + f" | {_x(ratio(med.get('waypoint_tls'), med.get('pgbouncer_tls')))}"
            + f" | {_x(ratio(med.get('waypoint'), med.get('direct')))}"
            + f" | {_x(ratio(med.get('waypoint_tls'), med.get('direct')))}"
            + f" | {_fmt(cpu_us['waypoint'], '.1f')} | {_fmt(cpu_us['pgbouncer'], '.1f')}"
            + f" | {_fmt(cpu_us['waypoint_tls'], '.1f')} | {_fmt(cpu_us['pgbouncer_tls'], '.1f')} |"
        )
    lines += ["", "Samples (TPS per repetition):", ""]
    for s in present:
        for n in clients:
            samples = r.relay[s].get(n, [])
            lines.append(f"- {SYSTEM_LABELS[s]}, {n} clients: " + ", ".join(f"{x:,.0f}" for x in samples))

    if r.audit:
        audit_clients = sorted({n for by in r.audit.values() for n in by})
        lines += [
            "",
            f"## Statement audit: `pgbench -S -T {m.get('audit_seconds', '?')} -j 2`, Waypoint with `[audit]` on "
            "(`parameters = \"hash\"`, file sink) and off, interleaved, TPS",
            "",
            "| clients | Waypoint audit off | Waypoint audit on | on/off (bar >= 0.85) | verdict | CPU µs/transaction: off | on |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in audit_clients:
            off, on = median(r.audit.get("waypoint", {}).get(n, [])), median(r.audit.get("waypoint_audit", {}).get(n, []))
            v = audit_ratio(r, n)
            verdict = "n/a" if v is None else ("PASS" if v >= 0.85 else "MISS")
            lines.append(
                f"| {n} | {_fmt(off)} | {_fmt(on)} | {_x(v)} | {verdict} | "
                f"{_fmt(_cpu_per_txn(r, 'waypoint', n, audit=True), '.1f')} | {_fmt(_cpu_per_txn(r, 'waypoint_audit', n, audit=True), '.1f')} |"
            )
        lines += ["", "Samples (TPS per repetition):", ""]
        for s, label in (("waypoint", "audit off"), ("waypoint_audit", "audit on")):
            for n in audit_clients:
                lines.append(f"- Waypoint {label}, {n} clients: " + ", ".join(f"{x:,.0f}" for x in r.audit.get(s, {}).get(n, [])))
        if r.audit_records is not None:
            lines += ["", f"The audit file's hash chain verified: {r.audit_records:,} records in the newest file."]

    lines += [
        "",
        f"## Connection setup: `pgbench -S -C -T {m.get('connect_seconds', '?')} -c 1 -j 1`, average connection time",
        "",
        "| system | ms (median) | samples (ms) |",
        "|---|---|---|",
    ]
    lines += _connect_rows(r.connect, ".2f")

    def connect_ratio(a: str, b: str) -> str:
        return _x(ratio(median(r.connect.get(a, [])), median(r.connect.get(b, []))))

    lines.append(f"Waypoint/direct: {connect_ratio('waypoint', 'direct')}; Waypoint pooled/direct: {connect_ratio('waypoint_pooled', 'direct')}")
    lines.append("")
    lines.append(
        f"Reported, not a bar: PgBouncer pooled/direct: {connect_ratio('pgbouncer', 'direct')}; "
        f"Waypoint pooled/PgBouncer pooled: {connect_ratio('waypoint_pooled', 'pgbouncer')} "
        "(PgBouncer authenticates nobody here; Waypoint asks tailscaled on every connection)"
    )
    lines += [
        "",
        f"### A new connection per transaction: `pgbench -S -n -C -T {m.get('connect_seconds', '?')} -c 8 -j 2`",
        "",
        "| system | TPS (median) | samples |",
        "|---|---|---|",
    ]
    lines += _connect_rows(r.connect_tps, ",.0f")
    lines.append(
        "Waypoint pooled/direct: "
        + _x(ratio(median(r.connect_tps.get("waypoint_pooled", [])), median(r.connect_tps.get("direct", []))))
        + "; PgBouncer pooled/direct (reported): "
        + _x(ratio(median(r.connect_tps.get("pgbouncer", [])), median(r.connect_tps.get("direct", []))))
    )
    if r.bursts:
        lines += [
            "",
            "### Concurrent logins through Waypoint (each identity a source address 127.0.0.N)",
            "",
            "| burst | connections | identities | failures | p50 ms | p99 ms | max ms | wall s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for bs in r.bursts:
            lines.append(
                f"| {bs.label} | {bs.connections} | {bs.identities} | {bs.failures} | {bs.p50_ms:.1f} | "
                f"{bs.p99_ms:.1f} | {bs.max_ms:.1f} | {bs.wall_s:.2f} |"
            )
        errs = sorted({e for b in r.bursts for e in b.errors})
        if errs:
            lines += ["", "Errors seen: " + "; ".join(errs[:10])]
        lines += ["", "cold: the first logins of every identity (role provisioning included, single flight per role); warm: roles provisioned and cached."]

    lines += [
        "",
        f"## Bulk: `COPY (SELECT lpad(g::text, 200, 'x') FROM generate_series(1, {m.get('bulk_rows', '?')}) g) TO STDOUT` "
        f"({m.get('bulk_mb', 0):.0f} MB) via psql `\\copy ... to '/dev/null'`",
        "",
        "| system | MB/s (median) | samples | ratio to direct |",
        "|---|---|---|---|",
    ]
    for s in SYSTEMS:
        if s in r.bulk:
            bulk_med = median(r.bulk[s])
            lines.append(
                f"| {SYSTEM_LABELS[s]} | {_fmt(bulk_med, '.1f')} | " + ", ".join(f"{x:.1f}" for x in r.bulk[s])
                + f" | {_x(ratio(bulk_med, median(r.bulk.get('direct', []))))} |"
            )

    fp = r.footprint
    lines += ["", "## Footprint: RSS of the Waypoint process with idle sessions open", ""]
    if fp is None:
        lines.append("not measured in this run")
    else:
        lines += [
            "| sessions open / wanted | RSS before (KiB) | RSS with sessions (KiB) | per session (KiB) | errors |",
            "|---|---|---|---|---|",
            f"| {fp.sessions_open} / {fp.sessions_wanted} | {fp.rss_before_kib:,} | {fp.rss_after_kib:,} | "
            f"{fp.per_session_kib:.1f} | {len(fp.errors)} |",
        ]
        if fp.errors:
            lines += ["", "Errors seen: " + "; ".join(sorted(set(fp.errors))[:10])]

    if chart_name:
        lines += ["", f"![relay and connect figures]({chart_name})"]
    lines += ["", "## Machine", ""]
    for k in ("nproc", "cpu_model", "memory", "kernel", "load_note"):
        if k in m:
            lines.append(f"- {k}: {m[k]}")
    lines += ["", "## Versions", ""]
    for k in ("postgresql", "pgbouncer", "python", "waypoint_git"):
        if k in m:
            lines.append(f"- {k}: {m[k]}")
    lines += ["", "## Commands", "", "```"]
    lines += r.commands
    lines += ["```"]
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def to_json(r: Results) -> dict[str, Any]:
    return {
        "meta": r.meta,
        "relay": {s: {str(n): v for n, v in by.items()} for s, by in r.relay.items()},
        "relay_cpu": {s: {str(n): v for n, v in by.items()} for s, by in r.relay_cpu.items()},
        "connect": r.connect,
        "connect_tps": r.connect_tps,
        "bursts": [attrs.asdict(b) for b in r.bursts],
        "bulk": r.bulk,
        "audit": {s: {str(n): v for n, v in by.items()} for s, by in r.audit.items()},
        "audit_cpu": {s: {str(n): v for n, v in by.items()} for s, by in r.audit_cpu.items()},
        "audit_records": r.audit_records,
        "footprint": None if r.footprint is None else {**attrs.asdict(r.footprint), "per_session_kib": r.footprint.per_session_kib},
        "rows": rows(r),
        "bars": [{"name": b.name, "target": b.target, "value": b.value, "verdict": b.verdict} for b in bars(r)],
        "commands": r.commands,
        "notes": r.notes,
    }


def render_chart(r: Results, path: Path) -> str | None:
    """Write the PNG; returns None, or why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    clients = sorted({n for by in r.relay.values() for n in by})
    present = [s for s in SYSTEMS if s in r.relay]
    width = 0.8 / max(1, len(present))
    for i, s in enumerate(present):
        xs = [c + (i - (len(present) - 1) / 2) * width for c in range(len(clients))]
        ys = [median(r.relay[s].get(n, [])) or 0.0 for n in clients]
        drawn = ax1.bar(xs, ys, width, label=SYSTEM_LABELS[s])
        # The deciding ratios on the Waypoint bars: against PgBouncer with the same client TLS.
        against = {"waypoint": "pgbouncer", "waypoint_tls": "pgbouncer_tls"}.get(s)
        if against in r.relay:
            ratios = [ratio(median(r.relay[s].get(n, [])), median(r.relay[against].get(n, []))) for n in clients]
            ax1.bar_label(drawn, [f"{x:.2f}x" if x is not None else "" for x in ratios], fontsize=7)
    ax1.set_xticks(range(len(clients)), [f"{n} clients" for n in clients])
    ax1.set_ylabel("TPS (pgbench -S), median")
    ax1.set_title("Relay throughput")
    if present:
        ax1.legend(fontsize=8)
    labels: list[str] = []
    values: list[float] = []
    for s, lab in (("direct", "direct\nSCRAM"), ("waypoint", "Waypoint"), ("waypoint_pooled", "Waypoint\npooled"), ("pgbouncer", "PgBouncer\npooled")):
        v = median(r.connect.get(s, []))
        if v is not None:
            labels.append(lab)
            values.append(v)
    warm = [b for b in r.bursts if b.label == "warm"] or r.bursts
    if warm:
        labels += ["burst p50", "burst p99"]
        values += [statistics.median(b.p50_ms for b in warm), statistics.median(b.p99_ms for b in warm)]
    if values and min(values) > 0:
        bars_ = ax2.bar(range(len(values)), values, color=["tab:blue", "tab:green", "tab:cyan", "tab:orange", "tab:olive", "tab:red"][: len(values)])
        ax2.bar_label(bars_, fmt="%.1f", fontsize=8)
        ax2.set_xticks(range(len(values)), labels, fontsize=8)
        ax2.set_yscale("log")
        ax2.set_ylabel("ms (log scale)")
    else:
        ax2.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_title("Connection setup")
    title = f"Waypoint bench {r.meta.get('date', '')} {r.meta.get('host', '')}"
    fig.suptitle(title + (" (quick)" if r.meta.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_report(r: Results, out_dir: Path, stem: str) -> tuple[Path, Path, Path | None]:
    """Write <stem>.md, <stem>.json and <stem>.png; returns their paths (png None if skipped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png: Path | None = out_dir / f"{stem}.png"
    assert png is not None
    why = render_chart(r, png)
    if why is not None:
        r.notes.append(why)
        png = None
    md = out_dir / f"{stem}.md"
    md.write_text(render_markdown(r, png.name if png else None))
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(to_json(r), indent=1, sort_keys=True) + "\n")
    return md, js, png


def expected_row_ids(systems: Sequence[str], clients: Sequence[int], bursts: Mapping[int, str]) -> list[str]:
    """The row ids a complete run produces (for the quick test)."""
    ids = [f"relay_tps.{s}.c{n}" for s in systems for n in clients]
    if "pgbouncer_tls" in systems:
        ids += [f"relay_ratio.waypoint_tls_to_pgbouncer_tls.c{n}" for n in clients]
    ids += [f"audit_tps.{s}.c{n}" for s in ("waypoint", "waypoint_audit") for n in clients]
    ids += [f"audit_ratio.on_to_off.c{n}" for n in clients] + ["audit_records"]
    connect = ["direct", "waypoint", "waypoint_pooled"] + (["pgbouncer"] if "pgbouncer" in systems else [])
    ids += [f"connect_ms.{s}" for s in connect] + [f"connect_tps.{s}.c8" for s in connect]
    for i, label in bursts.items():
        ids += [f"burst.{i}.{label}.p50_ms", f"burst.{i}.{label}.p99_ms", f"burst.{i}.{label}.failures"]
    ids += [f"bulk_mbps.{s}" for s in systems]
    ids += ["footprint.sessions_open", "footprint.rss_before_kib", "footprint.rss_after_kib", "footprint.per_session_kib"]
    return ids
