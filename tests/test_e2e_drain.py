"""Graceful shutdown of a real ``waypoint run -c FILE`` process (docs/operations.md#shutdown): after SIGTERM an open
session keeps working until it ends, new connections are refused, and the process exits 0 once
the session closes; a session still open at the drain deadline gets FATAL 57P01; a second
SIGTERM ends sessions at once. The LocalAPI stand-in runs as its own process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pg8000.native
from e2e_support import RawSession, create_app_database, db_rule, make_config_text, standin_process
from pgcluster import PgCluster
from state_support import free_port

WAYPOINT = Path(sys.executable).with_name("waypoint")


class _Waypoint:
    def __init__(self, cluster: PgCluster, tmp: Path, sock: str, drain: str, name: str) -> None:
        self.port = free_port()
        config = tmp / f"{name}.toml"
        config.write_text(
            make_config_text(
                cluster, socket_path=sock, listen=f"127.0.0.1:{self.port}", drain_timeout=drain
            )
        )
        self.log = open(tmp / f"{name}.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(WAYPOINT), "run", "-c", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, self.output()
                time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def signal(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def connect(self, db: str) -> pg8000.native.Connection:
        return pg8000.native.Connection(
            user="x", host="127.0.0.1", port=self.port, database=db, timeout=10, ssl_context=False
        )

    def raw(self, db: str) -> RawSession:
        env = type("E", (), {"host": "127.0.0.1", "port": self.port})()
        return RawSession.open(env, db)  # type: ignore[arg-type]


def _refused(wp: _Waypoint, db: str) -> str:
    try:
        wp.connect(db).close()
    except (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError) as exc:
        return str(exc)
    raise AssertionError("a new connection was accepted while draining")


def test_sigterm_drains_then_deadline_then_second_signal(pg15: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg15)
    erin = {"ip": "127.0.0.1", "login": "erin@example.com", "node": "erin-pc",
            "rules": [db_rule({db: {"permissions": ["readonly"]}})]}  # fmt: skip
    with standin_process(tmp_path, [erin]) as sock:
        # 1. Drain: the open session keeps working; new ones are refused; exit 0 after it ends.
        wp = _Waypoint(pg15, tmp_path, sock, "30s", "drain")
        try:
            conn = wp.connect(db)
            assert conn.run("select v from t") == [["one"]]
            wp.signal()
            time.sleep(0.5)
            assert conn.run("select 2") == [[2]]
            _refused(wp, db)
            time.sleep(1)
            assert conn.run("select 3") == [[3]]
            assert wp.proc.poll() is None
            t0 = time.monotonic()
            conn.close()
            assert wp.wait(10) == 0, wp.output()
            assert time.monotonic() - t0 < 5
            output = wp.output()
            assert "connection_end" in output and "shutdown_complete" in output, output
            assert pg15.admin_password not in output
        finally:
            wp.stop()

        # 2. Drain deadline: FATAL 57P01 to a session still open.
        wp = _Waypoint(pg15, tmp_path, sock, "2s", "deadline")
        try:
            raw = wp.raw(db)
            assert raw.read_result_of("select 1") == "ok:1"
            t0 = time.monotonic()
            wp.signal()
            err = raw.read_until_closed(timeout=10)
            assert err.get("S") == "FATAL" and err.get("C") == "57P01", err
            assert 1.5 < time.monotonic() - t0 < 6
            raw.close()
            assert wp.wait(10) == 0, wp.output()
        finally:
            wp.stop()

        # 3. A second SIGTERM ends sessions at once.
        wp = _Waypoint(pg15, tmp_path, sock, "30s", "immediate")
        try:
            raw = wp.raw(db)
            assert raw.read_result_of("select 1") == "ok:1"
            wp.signal()
            time.sleep(0.5)
            assert raw.read_result_of("select 2") == "ok:2"
            t0 = time.monotonic()
            wp.signal()
            err = raw.read_until_closed(timeout=10)
            assert err.get("S") == "FATAL" and err.get("C") == "57P01", err
            assert time.monotonic() - t0 < 3
            raw.close()
            assert wp.wait(10) == 0, wp.output()
        finally:
            wp.stop()
