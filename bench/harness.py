"""``python -m bench [--quick] [--out-dir DIR] [--only relay,audit,connect,burst,bulk,footprint]``

Waypoint's benchmark harness: one throwaway cluster, the LocalAPI stand-in
and ``waypoint run`` as processes, PgBouncer in session mode; relay TPS, connection setup,
concurrent logins, bulk COPY and idle-session footprint; interleaved systems, medians.
Writes ``<out-dir>/<date>-<host>[-quick].md`` (+ ``.json``, ``.png``) and prints the table.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from bench import pgclient
from bench.env import (
    BENCH_DB,
    REPO,
    SCRAM_USER,
    BenchEnv,
    BenchSetupError,
    audited_waypoint,
    cpu_seconds,
    identity_ips,
    open_bench_env,
)
from bench.report import BurstSample, Footprint, Results, rows, write_report

_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without|including)", re.M)
_CONN_TIME = re.compile(r"^average connection time = ([0-9.]+) ms", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_COPY_ROWS = re.compile(r"^COPY (\d+)", re.M)
BULK_ROW_BYTES = 201  # lpad(g::text, 200, 'x') + newline
SECTIONS = ("relay", "audit", "connect", "burst", "bulk", "footprint")


@attrs.frozen
class Profile:
    quick: bool
    scale: int
    relay_seconds: int
    relay_clients: tuple[int, ...]
    repetitions: int
    connect_seconds: int
    burst_identities: int
    burst_per_identity: int
    burst_repetitions: int
    bulk_rows: int
    footprint_sessions: int
    footprint_identities: int
    audit_seconds: int


FULL = Profile(
    quick=False, scale=10, relay_seconds=15, relay_clients=(1, 8, 32), repetitions=3,
    connect_seconds=10, burst_identities=50, burst_per_identity=10, burst_repetitions=3,
    bulk_rows=1_000_000, footprint_sessions=1000, footprint_identities=10, audit_seconds=15,
)  # fmt: skip
QUICK = Profile(
    quick=True, scale=1, relay_seconds=3, relay_clients=(1, 8, 32), repetitions=1,
    connect_seconds=3, burst_identities=50, burst_per_identity=2, burst_repetitions=1,
    bulk_rows=100_000, footprint_sessions=200, footprint_identities=4, audit_seconds=2,
)  # fmt: skip

BURST_FIRST_IP = 2  # 127.0.0.2 .. 127.0.0.51
FOOTPRINT_FIRST_IP = 100  # 127.0.0.100 ..


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


class ZeroTransactions(BenchSetupError):
    """pgbench ran its duration without completing one transaction."""


@attrs.frozen
class Target:
    name: str
    port: int
    env: dict[str, str]


def targets(env: BenchEnv) -> dict[str, Target]:
    out = {
        "direct": Target("direct", env.direct_port, {"PGUSER": SCRAM_USER, "PGPASSWORD": env.scram_password, "PGSSLMODE": "disable"}),
    }
    if env.pgbouncer_port is not None:
        out["pgbouncer"] = Target("pgbouncer", env.pgbouncer_port, {"PGUSER": SCRAM_USER, "PGSSLMODE": "disable"})
    out["waypoint"] = Target("waypoint", env.waypoint_port, {"PGUSER": "bench", "PGSSLMODE": "disable"})
    # Client TLS (sslmode=require, the same certificate), each right before Waypoint + TLS.
    if env.pgbouncer_tls_port is not None:
        out["pgbouncer_tls"] = Target("pgbouncer_tls", env.pgbouncer_tls_port, {"PGUSER": SCRAM_USER, "PGSSLMODE": "require"})
    out["waypoint_tls"] = Target("waypoint_tls", env.waypoint_port, {"PGUSER": "bench", "PGSSLMODE": "require"})
    return out


def _describe(t: Target, cmd: list[str]) -> str:
    shown = {k: ("***" if k == "PGPASSWORD" else v) for k, v in t.env.items()}
    return f"[{t.name}] " + " ".join(f"{k}={v}" for k, v in shown.items()) + " " + " ".join(cmd)


def run_pgbench(env: BenchEnv, t: Target, args: list[str], timeout: float, r: Results) -> str:
    cmd = [env.binary("pgbench"), *args, "-h", "127.0.0.1", "-p", str(t.port), BENCH_DB]
    r.command(_describe(t, ["pgbench", *args, "-h", "127.0.0.1", "-p", "<port>", BENCH_DB]))
    proc = subprocess.run(
        cmd, env=_clean_env(t.env), capture_output=True, text=True, timeout=timeout,
        check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    processed = _PROCESSED.search(proc.stdout)
    if proc.returncode == 0 and processed is not None and int(processed.group(1)) == 0:
        # Every client's connection setup took the whole -T (pgbench's clock starts before
        # its threads connect): a speed problem under load, not a harness failure.
        raise ZeroTransactions(f"pgbench {' '.join(args)} against {t.name} processed no transaction")
    if proc.returncode != 0 or "number of failed transactions: 0 " not in proc.stdout or processed is None:
        env.check_alive()
        raise BenchSetupError(
            f"pgbench {' '.join(args)} against {t.name} failed ({proc.returncode}): "
            f"{proc.stderr.strip()[-800:]}\n{proc.stdout.strip()[-800:]}"
        )
    return proc.stdout


T = TypeVar("T")


def in_rep_order(items: Sequence[T], rep: int) -> list[T]:
    """The systems of one repetition: in order on even repetitions, reversed on odd ones.

    The machine's speed drifts during a run (other load, clocks, caches); run always in the
    same order, the system that follows another would carry that drift in every sample of
    the pair. Alternating the order puts each system before and after its neighbour.
    """
    return list(items) if rep % 2 == 0 else list(reversed(items))


def measure_relay(env: BenchEnv, p: Profile, r: Results) -> None:
    ts = targets(env)
    for rep in range(p.repetitions):
        for n in p.relay_clients:
            for t in in_rep_order(list(ts.values()), rep):
                cpu0, wall0 = env.proxy_cpu_seconds(t.name), time.monotonic()
                relay_args = ["-S", "-n", "-T", str(p.relay_seconds), "-c", str(n), "-j", "2"]
                try:
                    out = run_pgbench(env, t, relay_args, p.relay_seconds + 120, r)
                except ZeroTransactions as exc:
                    # Once, with three times the duration; the report says so.
                    relay_args[3] = str(3 * p.relay_seconds)
                    r.notes.append(f"{exc} (connection setup took the whole run); retried with -T {relay_args[3]}")
                    log(r.notes[-1])
                    cpu0, wall0 = env.proxy_cpu_seconds(t.name), time.monotonic()
                    out = run_pgbench(env, t, relay_args, 3 * p.relay_seconds + 120, r)
                cpu1 = env.proxy_cpu_seconds(t.name)
                wall = time.monotonic() - wall0
                m = _TPS.search(out)
                if m is None:
                    raise BenchSetupError(f"no tps line in pgbench output for {t.name}:\n{out[-500:]}")
                tps = float(m.group(1))
                r.relay.setdefault(t.name, {}).setdefault(n, []).append(tps)
                if cpu0 is not None and cpu1 is not None:
                    r.relay_cpu.setdefault(t.name, {}).setdefault(n, []).append((cpu1 - cpu0) / wall)
                log(f"relay rep {rep + 1}/{p.repetitions} clients {n:>2} {t.name:<13} {tps:>10,.0f} tps")


def measure_audit(env: BenchEnv, p: Profile, r: Results) -> None:
    """``pgbench -S`` through Waypoint with ``[audit]`` on (a second ``waypoint run``, the
    same configuration plus bench/env.py AUDIT_CONFIG) and through Waypoint without,
    interleaved; both processes idle while the other is measured."""
    from waypoint.audit.chain import verify

    with audited_waypoint(env, log) as (port, proc, audit_file):
        plain = targets(env)["waypoint"]
        audited = Target("waypoint_audit", port, plain.env)
        pids = {"waypoint": env.waypoint.pid, "waypoint_audit": proc.pid}
        for rep in range(p.repetitions):
            for n in p.relay_clients:
                for t in in_rep_order([plain, audited], rep):
                    cpu0, wall0 = cpu_seconds(pids[t.name]), time.monotonic()
                    args = ["-S", "-n", "-T", str(p.audit_seconds), "-c", str(n), "-j", "2"]
                    m = _TPS.search(run_pgbench(env, t, args, p.audit_seconds + 120, r))
                    if m is None:
                        raise BenchSetupError(f"no tps line in pgbench output for {t.name}")
                    cpu = (cpu_seconds(pids[t.name]) - cpu0) / (time.monotonic() - wall0)
                    r.audit.setdefault(t.name, {}).setdefault(n, []).append(float(m.group(1)))
                    r.audit_cpu.setdefault(t.name, {}).setdefault(n, []).append(cpu)
                    log(f"audit rep {rep + 1}/{p.repetitions} clients {n:>2} {t.name:<15} {float(m.group(1)):>10,.0f} tps")
        # What the audited runs wrote: the newest file's records and its hash chain.
        time.sleep(0.5)  # the writer thread flushes every 10 ms
        report = verify([str(audit_file)])
        r.audit_records = report.records
        problem = "" if report.problem is None else f"; chain problem: {report.problem}"
        r.notes.append(f"audit: {audit_file.name} held {report.records:,} records at the end (rotated at 64 MB, 2 kept){problem}")
        if report.problem is not None or report.records == 0:
            raise BenchSetupError(f"the audited Waypoint's audit file is not a verified chain of records{problem}")


#: The connect section's systems: direct SCRAM, Waypoint without and with the pool, and
#: PgBouncer in session mode (it keeps its server connections: its pooled reconnect).
CONNECT_SYSTEMS = ("direct", "waypoint", "waypoint_pooled", "pgbouncer")
#: Clients of the connect section's throughput run (pgbench -S -C: a new connection per
#: transaction).
CONNECT_CLIENTS = 8


def connect_targets(env: BenchEnv) -> dict[str, Target]:
    ts = targets(env)
    ts["waypoint_pooled"] = Target("waypoint_pooled", env.waypoint_pooled_port, {"PGUSER": "bench", "PGSSLMODE": "disable"})
    return {name: ts[name] for name in CONNECT_SYSTEMS if name in ts}


def measure_connect(env: BenchEnv, p: Profile, r: Results) -> None:
    ts = connect_targets(env)
    for name, t in ts.items():
        if name.startswith("waypoint"):
            # Provision the role (and, pooled, leave one backend in the pool): the figures are
            # for a role that exists, as for every connection after a caller's first.
            run_pgbench(env, t, ["-S", "-n", "-C", "-t", "3", "-c", "1", "-j", "1"], 120, r)
    for rep in range(p.repetitions):
        for name, t in in_rep_order(list(ts.items()), rep):
            out = run_pgbench(env, t, ["-S", "-n", "-C", "-T", str(p.connect_seconds), "-c", "1", "-j", "1"], p.connect_seconds + 120, r)
            m = _CONN_TIME.search(out)
            if m is None:  # older pgbench: the latency includes the connection
                m = _LATENCY.search(out)
                r.notes.append("pgbench printed no 'average connection time': latency average used")
            if m is None:
                raise BenchSetupError(f"no connection time in pgbench output for {name}:\n{out[-500:]}")
            ms = float(m.group(1))
            r.connect.setdefault(name, []).append(ms)
            log(f"connect rep {rep + 1}/{p.repetitions} {name:<15} {ms:.2f} ms")
        for name, t in in_rep_order(list(ts.items()), rep):
            n = str(CONNECT_CLIENTS)
            out = run_pgbench(env, t, ["-S", "-n", "-C", "-T", str(p.connect_seconds), "-c", n, "-j", "2"], p.connect_seconds + 120, r)
            m = _TPS.search(out)
            if m is None:
                raise BenchSetupError(f"no tps line in pgbench output for {name}:\n{out[-500:]}")
            tps = float(m.group(1))
            r.connect_tps.setdefault(name, []).append(tps)
            log(f"connect rep {rep + 1}/{p.repetitions} {name:<15} -C -c {n}: {tps:,.0f} tps")


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q * (len(s) - 1))))
    return s[k]


def measure_burst(env: BenchEnv, p: Profile, r: Results) -> None:
    ips = identity_ips(BURST_FIRST_IP, p.burst_identities)
    env.add_identities(ips)
    total = p.burst_identities * p.burst_per_identity
    r.command(
        f"[waypoint] {total} logins at once: {p.burst_per_identity} from each of 127.0.0.{BURST_FIRST_IP}.."
        f"127.0.0.{BURST_FIRST_IP + p.burst_identities - 1} (bench/pgclient.py: StartupMessage to ReadyForQuery, then Terminate)"
    )
    for rep in range(p.burst_repetitions):
        label = "cold" if rep == 0 else "warm"
        start = time.monotonic()
        results = trio.run(
            lambda: pgclient.burst("127.0.0.1", env.waypoint_port, ips, p.burst_per_identity, database=BENCH_DB, timeout=120)
        )
        wall = time.monotonic() - start
        ok = [x.seconds * 1000 for x in results if x.ok]
        errors = [x.error for x in results if not x.ok]
        sample = BurstSample(
            label=label, connections=len(results), identities=len(ips), failures=len(errors),
            p50_ms=_percentile(ok, 0.5) if ok else 0.0, p99_ms=_percentile(ok, 0.99) if ok else 0.0,
            max_ms=max(ok, default=0.0), wall_s=wall, errors=sorted(set(errors))[:20],
        )  # fmt: skip
        r.bursts.append(sample)
        log(f"burst {label}: {len(results)} logins, {len(errors)} failed, p50 {sample.p50_ms:.1f} ms, p99 {sample.p99_ms:.1f} ms")
        env.check_alive()
        time.sleep(1)  # let the backends of the closed sessions exit


def measure_bulk(env: BenchEnv, p: Profile, r: Results) -> None:
    sql = f"\\copy (SELECT lpad(g::text, 200, 'x') FROM generate_series(1, {p.bulk_rows}) g) TO '/dev/null'"
    mb = p.bulk_rows * BULK_ROW_BYTES / 1e6
    ts = targets(env)
    for rep in range(p.repetitions):
        for t in ts.values():
            args = ["-X", "-h", "127.0.0.1", "-p", str(t.port), "-d", BENCH_DB, "-v", "ON_ERROR_STOP=1", "-c", sql]
            r.command(_describe(t, ["psql", *args[:4], "<port>", *args[5:-1], f'"{sql}"']))
            start = time.perf_counter()
            proc = subprocess.run(
                [env.binary("psql"), *args], env=_clean_env(t.env), capture_output=True, text=True,
                timeout=600, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            elapsed = time.perf_counter() - start
            m = _COPY_ROWS.search(proc.stdout)
            if proc.returncode != 0 or m is None or int(m.group(1)) != p.bulk_rows:
                env.check_alive()
                raise BenchSetupError(f"bulk COPY through {t.name} failed: {proc.stderr.strip()[-800:]} {proc.stdout[-200:]}")
            r.bulk.setdefault(t.name, []).append(mb / elapsed)
            log(f"bulk rep {rep + 1}/{p.repetitions} {t.name:<13} {mb / elapsed:.1f} MB/s")


def measure_footprint(env: BenchEnv, p: Profile, r: Results) -> None:
    ips = identity_ips(FOOTPRINT_FIRST_IP, p.footprint_identities)
    env.add_identities(ips)

    async def run() -> Footprint:
        # One login per identity first: the role is provisioned and cached before "before".
        await pgclient.burst("127.0.0.1", env.waypoint_port, ips, 1, database=BENCH_DB, timeout=120)
        await trio.sleep(2)
        before = env.waypoint_rss_kib()
        streams, errors = await pgclient.hold_sessions(
            "127.0.0.1", env.waypoint_port, ips, p.footprint_sessions, database=BENCH_DB, batch=100, timeout=120
        )
        try:
            await trio.sleep(3)
            after = env.waypoint_rss_kib()
        finally:
            await pgclient.close_sessions(streams)
        return Footprint(p.footprint_sessions, len(streams), errors, before, after)

    r.command(
        f"[waypoint] {p.footprint_sessions} idle sessions from 127.0.0.{FOOTPRINT_FIRST_IP}..127.0.0."
        f"{FOOTPRINT_FIRST_IP + p.footprint_identities - 1}, 100 opened at a time; VmRSS from /proc/<waypoint pid>/status"
    )
    fp = trio.run(run)
    r.footprint = fp
    log(f"footprint: {fp.sessions_open}/{fp.sessions_wanted} sessions, RSS {fp.rss_before_kib} -> {fp.rss_after_kib} KiB, {fp.per_session_kib:.1f} KiB/session")
    env.check_alive()


def machine_meta() -> dict[str, str]:
    meta: dict[str, str] = {"nproc": str(os.cpu_count())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                meta["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                meta["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
        meta["load_note"] = "load average (1, 5, 15 min) at start: " + _loadavg()
    except OSError:
        pass
    meta["kernel"] = platform.release()
    return meta


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "waypoint"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + (" (waypoint/ has uncommitted changes)" if dirty else "")


def print_summary(r: Results, md: Path) -> None:
    text = md.read_text()
    # The tables only (machine/commands are in the file).
    cut = text.find("\n## Machine")
    print(text[: cut if cut > 0 else None])
    print(f"report: {md}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Waypoint benchmark harness (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (CI): short, one repetition, small sizes")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results", help="where the report goes (default bench/results)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--no-pgbouncer", action="store_true", help="skip the PgBouncer rows")
    parser.add_argument("--profile-waypoint", type=Path, metavar="FILE", help="run waypoint under cProfile, stats written to FILE at exit")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    p = QUICK if args.quick else FULL

    now = datetime.datetime.now()
    host = socket.gethostname().split(".")[0] or "host"
    stem = f"{now:%Y-%m-%d}-{host}" + ("-quick" if p.quick else "")
    r = Results()
    r.meta.update(machine_meta())
    r.meta.update(
        date=f"{now:%Y-%m-%d %H:%M}", host=host, quick=p.quick, repetitions=p.repetitions,
        relay_seconds=p.relay_seconds, connect_seconds=p.connect_seconds, bulk_rows=p.bulk_rows,
        audit_seconds=p.audit_seconds,
        bulk_mb=p.bulk_rows * BULK_ROW_BYTES / 1e6, scale=p.scale, sections=only,
        python=sys.version.split()[0], waypoint_git=git_sha(),
    )  # fmt: skip
    r.notes.append(f"pgbench scale {p.scale}; PostgreSQL fsync=off, shared_buffers=256MB; every process on one 2-core machine with the harness and pgbench")
    prefix: list[str] = []
    if args.profile_waypoint:
        prefix = [sys.executable, "-m", "cProfile", "-o", str(args.profile_waypoint.resolve())]
        r.notes.append("waypoint ran under cProfile: its figures are slower than without")
    footprint = p.footprint_sessions if "footprint" in only else 0
    burst = p.burst_identities * p.burst_per_identity if "burst" in only else 0
    try:
        with open_bench_env(
            scale=p.scale, max_connections=max(300, footprint + burst + 200),
            max_conns_total=max(2000, footprint + burst + 200), with_pgbouncer=not args.no_pgbouncer,
            waypoint_prefix=prefix, log=log,
        ) as env:  # fmt: skip
            r.meta["postgresql"] = env.cluster.execute("SELECT version()")[0][0]
            r.meta["pgbouncer"] = env.pgbouncer_version or f"none ({env.pgbouncer_note})"
            if env.pgbouncer_port is None and not args.no_pgbouncer:
                r.notes.append(env.pgbouncer_note)
            r.command(f"waypoint: {' '.join(env.waypoint_command)}  (config: bench/env.py waypoint_config_text)")
            r.command(f"pgbench -i -q -s {p.scale} {BENCH_DB}  (as the admin role, which owns the tables)")
            measures = {"relay": measure_relay, "audit": measure_audit, "connect": measure_connect, "burst": measure_burst, "bulk": measure_bulk, "footprint": measure_footprint}
            try:
                for section in SECTIONS:
                    if section in only:
                        log(f"--- {section}")
                        measures[section](env, p, r)
                        env.check_alive()
            except BaseException:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                kept = args.out_dir / f"{stem}-failed-waypoint.log"
                kept.write_bytes(env.waypoint_log.read_bytes()[-2_000_000:])
                log(f"waypoint's log kept in {kept}")
                raise
    except BenchSetupError as exc:
        log(f"FAILED: {exc}")
        return 1
    md, _js, png = write_report(r, args.out_dir, stem)
    print_summary(r, md)
    if png is not None:
        print(f"chart: {png}")
    bad = [k for k, v in rows(r).items() if v is None]
    if bad:
        log(f"rows without a value: {', '.join(bad)}")
    return 0
