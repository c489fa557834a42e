"""``waypoint run -c FILE``: the daemon."""

from __future__ import annotations

import argparse
import sys

import trio

from waypoint.config.load import ConfigError, load_config
from waypoint.observability.log import configure, get_logger
from waypoint.service.notify import Notifier


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="waypoint.toml", help="config file (TOML)")
    parser.add_argument(
        "--log-format", choices=["human", "json"], default="human", help="log line format"
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
    from waypoint.app import StartupRefused
    from waypoint.app import run as run_app

    log = get_logger("cli")
    try:
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
