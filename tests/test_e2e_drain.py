"""Graceful shutdown of a real ``waypoint run -c FILE`` process (docs/operations.md#shutdown): after SIGTERM an open
session keeps working until it ends, new connections are refused, and the process exits 0 once
the session closes; a session still open at the drain deadline gets FATAL 57P01; a second
SIGTERM ends sessions at once. The LocalAPI stand-in runs as its own process.

What ended each session is read from Waypoint's own JSON log (the ``drain_deadline`` event's
``reason``, each ``connection_end``), never from how long it took; that the deadline never
comes early is tests/test_drain_deadline.py (on trio's MockClock)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
            [str(WAYPOINT), "run", "--log-format", "json", "-c", str(config)],
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

    def events(self) -> list[dict[str, Any]]:
        """Waypoint's log lines so far (JSON), in order."""
        lines = self.output().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for_event(self, name: str, timeout: float = 20) -> None:
        """Poll the log (bounded) until an event ``name`` is in it."""
        deadline = time.monotonic() + timeout
        while not any(e["event"] == name for e in self.events()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.05)

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


def _names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def _session_end(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The one ``connection_end`` of erin's session."""
    ends = [
        e for e in events if e["event"] == "connection_end" and e.get("login") == "erin@example.com"
    ]
    assert len(ends) == 1, events
    return ends[0]


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
            wp.wait_for_event("shutdown_begin")
            assert conn.run("select 2") == [[2]]
            _refused(wp, db)
            time.sleep(1)
            assert conn.run("select 3") == [[3]]
            assert wp.proc.poll() is None
            conn.close()
            # Well inside the 30 s drain_timeout: the process ended because the session did.
            assert wp.wait(10) == 0, wp.output()
            events = _names(wp.events())
            assert "drain_deadline" not in events, events
            assert _session_end(wp.events())["outcome"] == "client_closed", wp.output()
            assert events[-1] == "shutdown_complete", events
            assert pg15.admin_password not in wp.output()
        finally:
            wp.stop()

        # 2. Drain deadline: FATAL 57P01 to a session still open.
        wp = _Waypoint(pg15, tmp_path, sock, "2s", "deadline")
        try:
            raw = wp.raw(db)
            assert raw.read_result_of("select 1") == "ok:1"
            wp.signal()
            err = raw.read_until_closed(timeout=10)
            assert err.get("S") == "FATAL" and err.get("C") == "57P01", err
            raw.close()
            assert wp.wait(10) == 0, wp.output()
            events = wp.events()
            # One signal; the drain stopped waiting because drain_timeout ran out, and only
            # then was the session ended.
            assert [e["count"] for e in events if e["event"] == "signal"] == [1], events
            deadline = [e for e in events if e["event"] == "drain_deadline"]
            assert [(e["reason"], e["sessions"]) for e in deadline] == [("timeout", 1)], events
            end = _session_end(events)
            assert (end["outcome"], end["sqlstate"]) == ("ended", "57P01"), end
            assert "drain deadline" in end["detail"], end
            assert events.index(deadline[0]) < events.index(end), events
        finally:
            wp.stop()

        # 3. A second SIGTERM ends sessions at once.
        wp = _Waypoint(pg15, tmp_path, sock, "30s", "immediate")
        try:
            raw = wp.raw(db)
            assert raw.read_result_of("select 1") == "ok:1"
            wp.signal()
            wp.wait_for_event("shutdown_begin")
            assert raw.read_result_of("select 2") == "ok:2"
            wp.signal()
            # Bounded well inside the 30 s drain_timeout.
            err = raw.read_until_closed(timeout=10)
            assert err.get("S") == "FATAL" and err.get("C") == "57P01", err
            raw.close()
            assert wp.wait(10) == 0, wp.output()
            events = wp.events()
            assert [e["count"] for e in events if e["event"] == "signal"] == [1, 2], events
            deadline = [e for e in events if e["event"] == "drain_deadline"]
            assert [e["reason"] for e in deadline] == ["immediate"], events
            assert _session_end(events)["sqlstate"] == "57P01", events
        finally:
            wp.stop()
