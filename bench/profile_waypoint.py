"""Profile the Waypoint process under one benchmark load, with py-spy attached to its PID.

``python -m bench.profile_waypoint --load relay --clients 1 --seconds 15 [--tls] [--out DIR]``
``python -m bench.profile_waypoint --load connect --seconds 15 [--pooled]`` (``--pooled``: the listener with the pool on)
``python -m bench.profile_waypoint --load bulk``

Sets up the same world as ``python -m bench`` (without PgBouncer), starts the load, records
``py-spy record --format raw`` (collapsed stacks, GIL-holding and idle frames excluded) for
the load's duration, and prints the functions that dominate: by self samples (the leaf
frame) and by inclusive samples (anywhere on the stack), per thread. py-spy comes from PyPI
(``pip install py-spy``); it needs ptrace (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs

from bench.env import BENCH_DB, BenchSetupError, open_bench_env
from bench.harness import _clean_env, log, targets

_FRAME_SKIP = ("<module>", "run (trio", "_run_cmd", "main (waypoint/cli")


def _py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise BenchSetupError("py-spy is not installed: pip install py-spy")
    return exe


def summarize(raw: Path, top: int) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        if frames and frames[0].startswith(("thread", "process")):
            threads[frames[0]] += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    if total == 0:
        return "py-spy recorded no samples (the process was idle, or ptrace was refused)"
    out = [f"{total} samples"]
    if threads:
        out.append("by thread: " + ", ".join(f"{t} {c * 100 / total:.0f}%" for t, c in threads.most_common()))
    out.append("\nself (leaf frame):")
    out += [f"  {c * 100 / total:5.1f}%  {f}" for f, c in self_counts.most_common(top)]
    out.append("\ninclusive (on the stack):")
    out += [
        f"  {c * 100 / total:5.1f}%  {f}"
        for f, c in incl_counts.most_common(top * 3)
        if not f.startswith(("process", "thread")) and not any(s in f for s in _FRAME_SKIP)
    ][:top]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_waypoint", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--load", choices=["relay", "connect", "bulk"], default="relay")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--tls", action="store_true", help="clients use sslmode=require")
    parser.add_argument("--pooled", action="store_true", help="the listener with the pool on")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the raw stacks here (default: a temp dir)")
    args = parser.parse_args(argv)
    py_spy = _py_spy()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="wp-prof-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"waypoint-{args.load}{'-tls' if args.tls else ''}-c{args.clients}.txt"
    try:
        with open_bench_env(scale=1, max_connections=300, max_conns_total=1000, with_pgbouncer=False, log=log) as env:
            t = targets(env)["waypoint_tls" if args.tls else "waypoint"]
            if args.pooled:
                t = attrs.evolve(t, port=env.waypoint_pooled_port)
            if args.load == "bulk":
                rows = 2_000_000
                cmd = [env.binary("psql"), "-X", "-h", "127.0.0.1", "-p", str(t.port), "-d", BENCH_DB, "-c",
                       f"\\copy (SELECT lpad(g::text, 200, 'x') FROM generate_series(1, {rows}) g) TO '/dev/null'"]  # fmt: skip
            else:
                extra = ["-C", "-c", "1", "-j", "1"] if args.load == "connect" else ["-c", str(args.clients), "-j", "2"]
                cmd = [env.binary("pgbench"), "-S", "-n", "-T", str(args.seconds + 2), *extra,
                       "-h", "127.0.0.1", "-p", str(t.port), BENCH_DB]  # fmt: skip
            log("load: " + " ".join(cmd))
            load = subprocess.Popen(cmd, env=_clean_env(t.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                spy = subprocess.run(
                    [py_spy, "record", "--format", "raw", "--threads", "-r", "200", "-d", str(args.seconds),
                     "-o", str(raw), "-p", str(env.waypoint.pid)],
                    capture_output=True, text=True, timeout=args.seconds + 60, check=False,
                )  # fmt: skip
                stdout, stderr = load.communicate(timeout=args.seconds + 600)
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait(10)
            if spy.returncode != 0 or not raw.exists():
                raise BenchSetupError(f"py-spy failed: {spy.stderr.strip()[-800:]}")
            print("load output:", " | ".join(line for line in stdout.splitlines() if "tps" in line or "COPY" in line or "connection time" in line))
            if load.returncode != 0:
                print(f"load failed ({load.returncode}): {stderr.strip()[-500:]}")
    except BenchSetupError as exc:
        log(f"FAILED: {exc}")
        return 1
    print(summarize(raw, args.top))
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
