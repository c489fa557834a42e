"""System calls and context switches per relayed transaction, Waypoint and PgBouncer.

``python -m bench.syscalls [--clients 1,8] [--transactions 40000] [--repetitions 1] [--tls] [--audit] [--no-pgbouncer] [--where]``

Sets up the same world as ``python -m bench`` (scale 1) and, for each proxy and client
count, runs ``pgbench -S -n -t T -c N -j 2`` (T x N = ``--transactions``) with
``perf stat -e 'syscalls:sys_enter_*,context-switches'`` attached to the proxy's process
(every thread it has when the run starts: Waypoint's relay engine and its trio thread).
The counts are exact, not sampled, so unlike TPS or CPU time they barely move with the
machine's load: they say what the relay's hot path costs per transaction. The connection
setup of the N clients is inside the window (a few system calls per client, spread over
``--transactions``). How many ``epoll_wait`` calls and context switches a transaction takes
does depend on timing (with several clients, one wait returns several sockets); the
``recvfrom`` and ``sendto`` counts do not.

The CPU µs per transaction printed beside them are the proxy's own (``/proc/<pid>/stat``)
and are inflated by perf's tracepoints; compare them only with each other.

``--where``: also sample, with ``perf record -F 2000`` during a second run of the same
load, where the proxy's CPU time goes by object (the kernel, libc, the relay extension,
libpython, PgBouncer and libevent): how much of the relay is still the proxy's own code.

Needs ``perf`` (Debian: linux-perf) and the kernel's syscall tracepoints (root, or
``kernel.perf_event_paranoid`` low enough).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from bench.env import (
    BENCH_DB,
    BenchEnv,
    BenchSetupError,
    audited_waypoint,
    cpu_seconds,
    open_bench_env,
)
from bench.harness import Target, _clean_env, log, targets

_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_SYSCALL_PREFIX = "syscalls:sys_enter_"
#: perf stat's attach is asynchronous: the load starts this long after it.
_ATTACH_WAIT = 1.0


def parse_perf_stat(text: str) -> collections.Counter[str]:
    """Counts from ``perf stat -x ,`` output: syscall names without the tracepoint prefix
    (``epoll_wait``), other events as named (``context-switches``). Events perf could not
    count are left out."""
    counts: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#"):
            continue
        value, event = fields[0].strip(), fields[2].strip()
        try:
            count = float(value)
        except ValueError:
            continue  # <not counted>, <not supported>
        if count:
            counts[event.removeprefix(_SYSCALL_PREFIX)] += count
    return counts


@attrs.frozen
class Sample:
    target: str
    clients: int
    transactions: int
    tps: float
    cpu_us: float
    counts: collections.Counter[str]

    def report(self, floor: float = 0.01) -> str:
        tx = self.transactions
        switches = self.counts.get("context-switches", 0.0)
        calls = {k: v for k, v in self.counts.items() if k != "context-switches"}
        lines = [
            f"{self.target:<15} c={self.clients:<3} {tx} tx  {self.tps:>9,.0f} tps  "
            f"syscalls/tx {sum(calls.values()) / tx:5.2f}  context switches/tx {switches / tx:4.2f}  "
            f"CPU µs/tx {self.cpu_us:5.1f} (under perf)"
        ]
        lines += [
            f"    {name:<18} {count / tx:6.2f}"
            for name, count in sorted(calls.items(), key=lambda kv: -kv[1])
            if count / tx >= floor
        ]
        return "\n".join(lines)


def _load(env: BenchEnv, target: Target, clients: int, per_client: int) -> list[str]:
    """The ``pgbench -S -t`` run both measurements drive through the proxy."""
    return [env.binary("pgbench"), "-S", "-n", "-t", str(per_client), "-c", str(clients), "-j", str(min(clients, 2)),
            "-h", "127.0.0.1", "-p", str(target.port), BENCH_DB]  # fmt: skip


@contextlib.contextmanager
def _perf(args: list[str], pid: int, what: str) -> Iterator[None]:
    """``perf <args> -p pid`` attached for the block (given time to attach first), then told
    to stop (SIGINT) so it writes its output; bounded waits throughout."""
    proc = subprocess.Popen(
        ["perf", *args, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(_ATTACH_WAIT)
        if proc.poll() is not None:
            raise BenchSetupError(f"perf {what} exited ({proc.returncode}): {proc.communicate()[1].strip()[-500:]}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def measure(env: BenchEnv, target: Target, pid: int, clients: int, transactions: int, work: Path) -> Sample:
    per_client = max(1, transactions // clients)
    out = work / f"perf-{target.name}-{clients}.txt"
    with _perf(["stat", "-x", ",", "-e", f"{_SYSCALL_PREFIX}*,context-switches", "-o", str(out)], pid, "stat"):
        cpu0 = cpu_seconds(pid)
        run = subprocess.run(
            _load(env, target, clients, per_client), env=_clean_env(target.env), capture_output=True,
            text=True, timeout=900, check=False,
        )  # fmt: skip
        cpu1 = cpu_seconds(pid)
    m = _TPS.search(run.stdout)
    if run.returncode != 0 or m is None:
        raise BenchSetupError(f"pgbench against {target.name} failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    done = per_client * clients
    return Sample(target.name, clients, done, float(m.group(1)), (cpu1 - cpu0) / done * 1e6, parse_perf_stat(out.read_text()))


def parse_perf_report_dso(text: str) -> dict[str, float]:
    """Shares in percent by object from ``perf report --sort dso -g none -q --stdio``
    (``    95.91%  [kernel.kallsyms]``); other lines are left out."""
    shares: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split(None, 1)
        if len(fields) == 2 and fields[0].endswith("%"):
            try:
                shares[fields[1].strip()] = shares.get(fields[1].strip(), 0.0) + float(fields[0][:-1])
            except ValueError:
                continue
    return shares


def where(env: BenchEnv, target: Target, pid: int, clients: int, transactions: int, work: Path) -> str:
    """Sample the proxy's CPU by object while ``pgbench`` runs the same load again."""
    data = work / f"perf-{target.name}-{clients}.data"
    per_client = max(1, transactions // clients)
    with _perf(["record", "-q", "-F", "2000", "-o", str(data)], pid, "record"):
        subprocess.run(
            _load(env, target, clients, per_client), env=_clean_env(target.env), capture_output=True,
            timeout=900, check=False,
        )  # fmt: skip
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso", "-g", "none", "-q", "--stdio"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    shares = parse_perf_report_dso(report.stdout)
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:6]
    return f"{target.name:<15} c={clients:<3} CPU by object: " + ", ".join(f"{name} {share:.1f}%" for name, share in top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,8", help="client counts, comma separated (default 1,8)")
    parser.add_argument("--transactions", type=int, default=40000, help="per run, all clients together")
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--tls", action="store_true", help="also Waypoint and PgBouncer with client TLS")
    parser.add_argument("--audit", action="store_true", help="also Waypoint with statement audit on")
    parser.add_argument("--no-pgbouncer", action="store_true")
    parser.add_argument("--where", action="store_true", help="also sample the proxy's CPU by object (perf record)")
    args = parser.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients must be integers separated by commas, got {args.clients!r}")
    if any(c < 1 for c in clients) or args.transactions < 1 or args.repetitions < 1:
        parser.error("--clients, --transactions and --repetitions must be positive")
    if shutil.which("perf") is None:
        log("FAILED: perf is not installed (Debian: apt-get install linux-perf)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="wp-syscalls-"))
    try:
        with contextlib.ExitStack() as stack:
            env = stack.enter_context(
                open_bench_env(scale=1, max_connections=200, max_conns_total=1000,
                               with_pgbouncer=not args.no_pgbouncer, log=log)
            )  # fmt: skip
            ts = targets(env)
            chosen: list[tuple[Target, int]] = [(ts["waypoint"], env.waypoint.pid)]
            if env.pgbouncer_pid is not None:
                chosen.append((ts["pgbouncer"], env.pgbouncer_pid))
            if args.tls:
                chosen.append((ts["waypoint_tls"], env.waypoint.pid))
                if env.pgbouncer_tls_pid is not None:
                    chosen.append((ts["pgbouncer_tls"], env.pgbouncer_tls_pid))
            if args.audit:
                port, proc, _ = stack.enter_context(audited_waypoint(env, log))
                chosen.append((attrs.evolve(ts["waypoint"], name="waypoint_audit", port=port), proc.pid))
            for target, _ in chosen:  # the role provisioned, the first connections made
                subprocess.run(
                    [env.binary("pgbench"), "-S", "-n", "-t", "100", "-c", "2", "-h", "127.0.0.1",
                     "-p", str(target.port), BENCH_DB],
                    env=_clean_env(target.env), capture_output=True, timeout=120, check=False,
                )  # fmt: skip
            for _ in range(args.repetitions):
                for n in clients:
                    for target, pid in chosen:
                        print(measure(env, target, pid, n, args.transactions, work).report(), flush=True)
                        if args.where:
                            print(where(env, target, pid, n, args.transactions, work), flush=True)
    except BenchSetupError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
