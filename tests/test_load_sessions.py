"""Load through one Waypoint: many concurrent pgbench sessions with mixed
queries through a ``waypoint run`` subprocess, then all closed, and Waypoint is back where it
was: file descriptors and threads at their counts after a warm-up at the same concurrency,
RSS within 10 % of its value then (so allocator high-water marks are not taken for leaks),
no advisory lock left held by an admin session, and 0 failed transactions.

The default suite runs a short version (50 sessions for 10 s); ``-m slow`` runs 1000
sessions for 5 minutes (``WAYPOINT_LOAD_SECONDS`` / ``WAYPOINT_LOAD_CLIENTS`` override it).
The world (cluster, LocalAPI stand-in process, ``waypoint run``) is bench/env.py's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from waypoint.identity.localapi import DEFAULT_MAX_IDLE as LOCALAPI_MAX_IDLE

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.env import BENCH_DB, BenchEnv, open_bench_env, rss_kib  # noqa: E402

pytestmark = pytest.mark.pg

# Mixed queries (readonly grant): point lookups, an aggregate over a join, a transaction
# block, and a result of 1000 rows; weighted so every client runs all of them.
SCRIPTS = {
    "point.sql": "\\set aid random(1, 100000)\n"
    "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
    "join.sql": "\\set tid random(1, 10)\n"
    "SELECT b.bid, sum(t.tbalance) FROM pgbench_branches b "
    "JOIN pgbench_tellers t USING (bid) WHERE t.tid <= :tid GROUP BY b.bid;\n",
    "txn.sql": "\\set aid random(1, 99000)\n"
    "BEGIN;\n"
    "SELECT count(*) FROM pgbench_accounts WHERE aid BETWEEN :aid AND :aid + 100;\n"
    "SELECT abalance FROM pgbench_accounts WHERE aid = :aid + 1;\n"
    "COMMIT;\n",
    "rows.sql": "SELECT g, md5(g::text) FROM generate_series(1, 1000) AS g;\n",
}
WEIGHTS = {"point.sql": 6, "join.sql": 2, "txn.sql": 2, "rows.sql": 1}


@attrs.frozen
class ProcessFigures:
    fds: int
    threads: int
    rss_kib: int
    #: Of ``fds``, the TCP sockets (client and backend connections, listeners).
    tcp_fds: int


@attrs.frozen
class PgbenchResult:
    processed: int
    failed: int
    tps: float
    output: str


def _tcp_inodes() -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        inodes.update(line.split()[9] for line in lines if len(line.split()) > 9)
    return inodes


def _figures(pid: int) -> ProcessFigures:
    fd_dir = f"/proc/{pid}/fd"
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(f"{fd_dir}/{fd}"))
        except OSError:
            continue  # closed meanwhile
    tcp = _tcp_inodes()
    return ProcessFigures(
        fds=len(targets),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        rss_kib=rss_kib(pid),
        tcp_fds=sum(1 for t in targets if t.startswith("socket:[") and t[8:-1] in tcp),
    )


def _pgbench(env: BenchEnv, scripts: Path, *, clients: int, seconds: int, jobs: int) -> PgbenchResult:
    cmd = [
        env.binary("pgbench"), "-n", "-c", str(clients), "-j", str(jobs), "-T", str(seconds),
        "-h", "127.0.0.1", "-p", str(env.waypoint_port), "-U", "anyone",
        *(arg for name, w in WEIGHTS.items() for arg in ("-f", f"{scripts / name}@{w}")),
        BENCH_DB,
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ["PGSSLMODE"] = "disable"
    environ["PGCONNECT_TIMEOUT"] = "60"
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 300, env=environ,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"pgbench exited {proc.returncode}:\n{out[-3000:]}"
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    tps = re.search(r"tps = ([0-9.]+)", out)
    assert processed and failed and tps, out[-3000:]
    return PgbenchResult(int(processed[1]), int(failed[1]), float(tps[1]), out)


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return check()


def _settled(pid: int, timeout: float = 30.0) -> ProcessFigures:
    """The figures once the descriptor count holds still for 2 s (sessions closed, the
    admin pools kept: they belong to the starting state)."""
    deadline = time.monotonic() + timeout
    last = _figures(pid)
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = _figures(pid)
        if now.fds == last.fds:
            return now
        last = now
    return last


def _admin_advisory_locks(env: BenchEnv) -> int:
    rows = env.cluster.execute(
        "SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND a.usename = :u",
        u=env.cluster.admin_user,
    )
    return int(rows[0][0])


def _run_load(
    tmp_path: Path, *, clients: int, seconds: int, warmup: int, report: Callable[[str], None]
) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, text in SCRIPTS.items():
        (scripts / name).write_text(text)
    with open_bench_env(
        scale=1,
        max_connections=clients + 150,
        max_conns_total=clients + 50,
        with_pgbouncer=False,
        log=report,
    ) as env:
        pid = env.waypoint.pid
        start = _figures(pid)
        # Warm-up at full concurrency: the role is provisioned, and worker threads, buffers
        # and the allocator's arenas reach their working size; growth after it is a leak.
        warm = _pgbench(env, scripts, clients=clients, seconds=warmup, jobs=4)
        assert warm.failed == 0, warm.output[-2000:]
        warmed = _settled(pid)
        report(f"start {start}; after warm-up {warmed}")

        t0 = time.monotonic()
        result = _pgbench(env, scripts, clients=clients, seconds=seconds, jobs=4)
        report(
            f"load: {clients} sessions x {seconds}s in {time.monotonic() - t0:.0f}s: "
            f"{result.processed} transactions, {result.failed} failed, {result.tps:.0f} tps"
        )
        env.check_alive()
        assert result.failed == 0, result.output[-3000:]
        assert result.processed > 0

        # All closed: back to the starting counts (idle worker threads retire after ~10 s):
        # every TCP socket (client, backend), and the other descriptors give or take the
        # LocalAPI client's keep-alive connections (unix sockets, bounded, kept idle).
        fds_back = _wait_until(
            lambda: (f := _figures(pid)).tcp_fds <= warmed.tcp_fds
            and f.fds <= warmed.fds + LOCALAPI_MAX_IDLE,
            60,
        )
        threads_back = _wait_until(lambda: _figures(pid).threads <= warmed.threads, 60)
        rss_back = _wait_until(lambda: rss_kib(pid) <= warmed.rss_kib * 1.10, 60)
        after = _figures(pid)
        locks = _admin_advisory_locks(env)
        report(f"after {after}; admin advisory locks held: {locks}")
        assert fds_back, (
            f"file descriptors: {after.fds} after ({after.tcp_fds} TCP), {warmed.fds} after "
            f"warm-up ({warmed.tcp_fds} TCP; + up to {LOCALAPI_MAX_IDLE} kept-alive LocalAPI "
            "connections)"
        )
        assert threads_back, f"threads: {after.threads} after, {warmed.threads} after warm-up"
        assert rss_back, f"RSS: {after.rss_kib} KiB after, {warmed.rss_kib} KiB after warm-up"
        assert locks == 0
        sessions = env.cluster.execute(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE datname = :d "
            "AND usename <> :admin",
            d=BENCH_DB,
            admin=env.cluster.admin_user,
        )
        assert sessions == [[0]], sessions


def test_50_sessions_for_10_seconds_leave_nothing_behind(tmp_path: Path) -> None:
    _run_load(tmp_path, clients=50, seconds=10, warmup=5, report=print)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_1000_sessions_for_5_minutes_leave_nothing_behind(tmp_path: Path) -> None:
    clients = int(os.environ.get("WAYPOINT_LOAD_CLIENTS", "1000"))
    seconds = int(os.environ.get("WAYPOINT_LOAD_SECONDS", "300"))
    _run_load(tmp_path, clients=clients, seconds=seconds, warmup=20, report=print)
