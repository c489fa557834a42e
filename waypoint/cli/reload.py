"""``waypoint reload -c FILE``: validate the file, then signal the daemon running it to reload.

The daemon is found through the file's ``pid_file`` (``waypoint run`` writes its process id
there), or ``--pid-file``. An invalid file is reported here, every problem on its own line as
``waypoint check`` prints them, and no signal is sent (exit 1). Otherwise the process gets
SIGHUP (exit 0): it reads the file itself and logs ``config_reloaded`` (or why not); the
outcome is counted in ``waypoint_config_reloads_total{outcome}``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from waypoint.cli.options import load_or_report

TAKES_CONFIG = True  # -c/--config: the configuration file the daemon runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pid-file",
        metavar="FILE",
        help="where the daemon's process id is (default: the file's pid_file setting)",
    )


def run(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, refused="not reloaded")
    if config is None:
        return 1
    pid_file = args.pid_file or config.pid_file
    if not pid_file:
        print(
            f"{args.config}: no pid_file is set, so the daemon cannot be found;"
            " set pid_file, pass --pid-file, or send the daemon SIGHUP yourself",
            file=sys.stderr,
        )
        return 1
    try:
        with open(pid_file, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"{pid_file}: cannot read the pid file: {reason}", file=sys.stderr)
        return 1
    if not text.isdigit() or int(text) <= 1:
        print(f"{pid_file}: does not hold a process id", file=sys.stderr)
        return 1
    pid = int(text)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"{pid_file}: no process {pid} is running (a stale pid file?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"{pid_file}: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to waypoint (pid {pid}); the outcome is in its log", file=sys.stderr)
    return 0
