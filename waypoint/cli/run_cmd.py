"""``waypoint run -c FILE``: the daemon. SIGHUP (or ``waypoint reload -c FILE``) reloads the
file; with ``pid_file`` set, the process id is written there while it runs."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

import trio

from waypoint.config.load import ConfigError, load_config
from waypoint.observability.log import LEVELS, configure, get_logger
from waypoint.service.notify import Notifier

TAKES_CONFIG = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=["human", "json"],
        default="human",
        help="log line format when the file has no [log] format (default: human)",
    )


def run(args: argparse.Namespace) -> int:
    configure(args.log_format)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.config}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    configure(config.log.format or args.log_format, level=LEVELS[config.log.level])
    from waypoint.app import StartupRefused
    from waypoint.app import run as run_app

    log = get_logger("cli")
    try:
        with _pid_file(config.pid_file):
            trio.run(lambda: run_app(config, handle_signals=True, notifier=Notifier()))
    except KeyboardInterrupt:  # pragma: no cover - signals are handled inside
        return 130
    except (OSError, StartupRefused) as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    except BaseExceptionGroup as group:
        # An OSError at start (a listen address in use) arrives wrapped by trio's nurseries.
        failed, rest = group.split((OSError, StartupRefused))
        if failed is None or rest is not None:
            raise
        log.error("startup_failed", error="; ".join(str(e) for e in _leaves(failed)))
        return 1
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@contextlib.contextmanager
def _pid_file(path: str | None) -> Iterator[None]:
    """Write this process's id to ``path`` (replacing the file atomically), remove it at exit
    when it still names this process."""
    if path is None:
        yield
        return
    pid = os.getpid()
    tmp = f"{path}.{pid}.tmp"
    # A fresh file (never through a link someone left at that name), then renamed over.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            with open(path, encoding="ascii") as f:
                mine = f.read().strip() == str(pid)
            if mine:
                os.unlink(path)
