"""Query cancellation through Waypoint and protocol 3.2 (docs/protocol.md).

psql's Ctrl-C, psycopg's ``cancel()`` / ``cancel_safe()``, libpq 18 negotiating protocol 3.2
with PostgreSQL 18 (a 32-byte cancel key) and down to 3.0 with PostgreSQL 15, and a
CancelRequest whose key has the wrong length being ignored."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from e2e_support import (
    LISTENER,
    E2EEnv,
    RawSession,
    backend_state,
    capture_logs,
    create_app_database,
    e2e_env,
    wait_running_blocking,
)
from pgcluster import PgCluster

CANCELED = "canceling statement due to user request"
_SLEEP_30 = "select pg_sleep(30)"


def _sleep_running(env: E2EEnv) -> bool:
    """The psql statement is active on the server (pg_stat_activity)."""
    return bool(
        env.cluster.execute(
            "SELECT 1 FROM pg_catalog.pg_stat_activity WHERE state = 'active' AND query = :q",
            q=_SLEEP_30,
        )
    )


async def _psql_ctrl_c(env: E2EEnv, db: str, *, binary: str, extra_env: dict[str, str]) -> None:
    """psql runs pg_sleep(30) through Waypoint; SIGINT must cancel it (the query error says
    so; an uncanceled pg_sleep would outlast the bounded wait for psql)."""
    cmd = [binary, env.dsn(db, sslmode="disable"), "-X", "-c", _SLEEP_30]
    full_env = {**os.environ, **extra_env}

    def run() -> tuple[int, str]:
        proc = subprocess.Popen(
            cmd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        try:
            # Wait (bounded) until the statement runs on the server.
            deadline = time.monotonic() + 20
            while not _sleep_running(env) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            return proc.returncode, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    rc, err = await trio.to_thread.run_sync(run)
    assert CANCELED in err, err
    assert rc != 0


_PSYCOPG_CANCEL = r"""
import json, sys, threading, time
import psycopg
dsn, method = sys.argv[1], sys.argv[2]
with psycopg.connect(dsn, connect_timeout=20) as conn:
    errors = []
    pid = conn.info.backend_pid
    def canceller():
        # once the statement runs (pg_stat_activity, seen from a second session of the role)
        with psycopg.connect(dsn, connect_timeout=20, autocommit=True) as watch:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not watch.execute(
                "select 1 from pg_stat_activity where pid = %s and state = 'active'"
                " and query like 'select pg_sleep(30)%%'", (pid,)
            ).fetchone():
                time.sleep(0.02)
        try:
            getattr(conn, method)()
        except BaseException as exc:
            errors.append(repr(exc))
    t = threading.Thread(target=canceller)
    t.start()
    try:
        conn.execute("select pg_sleep(30)")
        message = "not canceled"
    except psycopg.errors.QueryCanceled as exc:
        message = str(exc)
    t.join(5)
    conn.rollback()
    one = conn.execute("select 1").fetchone()[0]
    print(json.dumps({"message": message, "errors": errors,
                      "protocol": conn.info.pgconn.full_protocol_version, "one": one}))
"""


def _psycopg_cancel(dsn: str, method: str) -> tuple[str, int, int]:
    """pg_sleep(30) canceled by ``conn.<method>()`` from another thread (an uncanceled one
    ends with the message "not canceled"); the session works afterwards. In a child process: libpq's blocking PQcancel (``cancel()``) holds the GIL,
    which would stall the in-process Waypoint it talks to."""
    r = subprocess.run(
        [sys.executable, "-c", _PSYCOPG_CANCEL, dsn, method],
        capture_output=True, text=True, timeout=40, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert not out["errors"], out
    return out["message"], out["protocol"], out["one"]


async def test_psql_ctrl_c_and_psycopg_cancel(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            await _psql_ctrl_c(env, db, binary="/usr/bin/psql", extra_env={})
            await env.assert_clean()
            for method in ("cancel", "cancel_safe"):
                message, _, one = await trio.to_thread.run_sync(
                    _psycopg_cancel, env.dsn(db), method
                )
                assert CANCELED in message, (method, message)
                assert one == 1
            await env.assert_clean()


async def test_protocol_32_with_postgresql_18(pg18: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg18)
    with trio.fail_after(120):
        async with e2e_env(pg18, tmp_path) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            message, protocol, one = await trio.to_thread.run_sync(
                _psycopg_cancel, env.dsn(db, max_protocol_version="3.2"), "cancel_safe"
            )
            assert protocol == 30002
            assert CANCELED in message and one == 1

            # What Waypoint forwarded: a 32-byte key in BackendKeyData.
            raw = await trio.to_thread.run_sync(RawSession.open, env, db, 2)
            try:
                assert raw.protocol == 2
                assert len(raw.secret) == 32
                await _cancel_checks(env, raw)
            finally:
                raw.close()

            # psql 18 (libpq 18) on 3.2: Ctrl-C.
            await _psql_ctrl_c(
                env, db, binary=str(pg18.binary("psql")), extra_env={"PGMAXPROTOCOLVERSION": "3.2"}
            )
            await env.assert_clean()


async def test_protocol_32_is_negotiated_down_with_postgresql_15(
    pg15: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg15)
    with trio.fail_after(90):
        async with e2e_env(pg15, tmp_path) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            message, protocol, one = await trio.to_thread.run_sync(
                _psycopg_cancel, env.dsn(db, max_protocol_version="3.2"), "cancel_safe"
            )
            assert protocol == 30000
            assert CANCELED in message and one == 1
            raw = await trio.to_thread.run_sync(RawSession.open, env, db, 2)
            try:
                assert raw.protocol == 0  # NegotiateProtocolVersion said 3.0
                assert len(raw.secret) == 4
                await _cancel_checks(env, raw)
            finally:
                raw.close()
            await env.assert_clean()


async def _cancel_checks(env: E2EEnv, raw: RawSession) -> None:
    """A CancelRequest with a key of the wrong length (or wrong bytes) is ignored; the right key
    cancels."""
    wrong_len = raw.secret + b"\x00" if len(raw.secret) == 4 else raw.secret[:4]
    wrong_bytes = bytes(b ^ 0xFF for b in raw.secret)

    def run() -> tuple[list[tuple[str, str] | None], str]:
        raw.send_query("select pg_sleep(30) /* wrong-keys */")
        wait_running_blocking(env.cluster, raw.pid, "wrong-keys")
        states = []
        for secret in (wrong_len, wrong_bytes):
            # Waypoint closes a cancel connection once it has forwarded or dropped the
            # request, so the statement's state read after it is final.
            _send_cancel(env, raw.pid, secret)
            states.append(backend_state(env.cluster, raw.pid))
        _send_cancel(env, raw.pid, raw.secret)
        return states, raw.read_result(timeout=10)

    states, result = await trio.to_thread.run_sync(run)
    for state in states:
        assert state is not None and state[0] == "active" and "wrong-keys" in state[1], states
    assert result.startswith("error:57014"), result


def _send_cancel(env: E2EEnv, pid: int, secret: bytes, *, source: str = "127.0.0.1") -> None:
    packet = struct.pack("!iii", 12 + len(secret), 80877102, pid) + secret
    with socket.create_connection((env.host, env.port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(packet)
        s.settimeout(5)
        # Waypoint closes the connection once it has forwarded (or dropped) the request.
        while s.recv(1024):
            pass


def cancel_outcomes(env: E2EEnv) -> dict[str, float]:
    """``waypoint_cancel_requests_total`` by outcome (absent ones left out)."""
    out: dict[str, float] = {}
    for family in env.running.metrics.registry.collect():
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "waypoint_cancel_requests_total" and labels["listener"] == LISTENER:
                out[labels["outcome"]] = sample.value
    return out


def _cancel_attempts(
    env: E2EEnv, raw: RawSession, marker: str, strangers: list[str], owner: str
) -> tuple[list[tuple[str, str] | None], str]:
    """Run a long statement on ``raw``; once it runs, each stranger sends the right key, and
    the statement's state is read after each; then ``owner`` sends it. Returns the states and
    the statement's result."""
    raw.send_query(f"select pg_sleep(30) /* {marker} */")
    wait_running_blocking(env.cluster, raw.pid, marker)
    states = []
    for source in strangers:
        # Waypoint closes a cancel connection only after it has sent the request on (and the
        # server has closed it) or dropped it, so the statement's state is final here.
        _send_cancel(env, raw.pid, raw.secret, source=source)
        states.append(backend_state(env.cluster, raw.pid))
    _send_cancel(env, raw.pid, raw.secret, source=owner)
    return states, raw.read_result(timeout=10)


async def assert_only_the_owner_cancels(
    env: E2EEnv,
    db: str,
    source: str,
    marker: str,
    strangers: list[str],
    owner: str,
    *,
    pid: int | None = None,
) -> None:
    """A session from ``source`` (whose backend is ``pid``, when given) runs a long statement;
    cancels with its right key from ``strangers`` leave it running, and the one from ``owner``
    cancels it (57014)."""
    raw = await trio.to_thread.run_sync(RawSession.open, env, db, 0, source)
    try:
        if pid is not None:
            assert raw.pid == pid
        states, result = await trio.to_thread.run_sync(
            _cancel_attempts, env, raw, marker, strangers, owner
        )
    finally:
        raw.close()
    for state in states:
        assert state is not None and state[0] == "active", states
    assert result.startswith("error:57014"), result


async def test_a_cancel_from_another_identity_with_the_right_key_does_not_cancel(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    rights = {db: {"permissions": ["readonly"]}}
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path) as env:
            env.grant("127.0.0.2", rights, login="ann@example.com", node="ann-laptop")
            env.grant("127.0.0.3", rights, login="bob@example.com", node="bob-laptop")
            # The same login on another node is the same identity.
            env.grant("127.0.0.6", rights, login="ann@example.com", node="ann-phone")
            for ip, node in (("127.0.0.4", "web1"), ("127.0.0.5", "web2")):
                env.grant(ip, rights, login="tagged-devices", node=node, tags=["tag:web"])

            # bob, not a tailnet peer, a tag
            strangers = ["127.0.0.3", "127.0.0.9", "127.0.0.4"]
            await assert_only_the_owner_cancels(env, db, "127.0.0.2", "ann", strangers, "127.0.0.6")
            # A tagged node is its node: another node with the same tag cannot cancel.
            await assert_only_the_owner_cancels(
                env, db, "127.0.0.4", "web1", ["127.0.0.5"], "127.0.0.4"
            )

            assert cancel_outcomes(env) == {
                "wrong_identity": 3.0,
                "unidentified": 1.0,
                "forwarded": 2.0,
            }
            await env.assert_clean()


async def test_a_cancel_flood_is_rate_limited_per_address_and_logged_per_burst(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    flood = 500
    with trio.fail_after(120), capture_logs() as logs:
        async with e2e_env(
            pg,
            tmp_path,
            tables_extra='[admission]\ncancel_burst = 20\ncancel_interval = "1h"\n',
        ) as env:
            env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}})
            # One summary window for the whole test (the default is 10 s, which a slow machine
            # could reach mid-flood: that would add a summary line, still bounded).
            cancel_log = env.running.contexts[LISTENER].admission.cancel_log
            cancel_log.window = 3600.0

            def send_flood() -> None:
                for _ in range(flood):
                    _send_cancel(
                        env, int.from_bytes(os.urandom(4), "big") >> 1, os.urandom(4),
                        source="127.0.0.9",
                    )

            await trio.to_thread.run_sync(send_flood)
            # 20 tokens, none back within the hour: the rest never reached the whois.
            assert cancel_outcomes(env) == {"unidentified": 20.0, "rate_limited": 480.0}

            # Another address still cancels its own statement.
            owner = await trio.to_thread.run_sync(RawSession.open, env, db, 0, "127.0.0.2")
            try:
                _, result = await trio.to_thread.run_sync(
                    _cancel_attempts, env, owner, "owner", [], "127.0.0.2"
                )
            finally:
                owner.close()
            assert result.startswith("error:57014"), result

            # What the burst's window end writes (the app's flush task, at the window's end).
            cancel_log.flush()
            cancel_lines = [
                str(getattr(r, "wp_event", ""))
                for r in logs.records
                if r.levelno >= logging.INFO and str(getattr(r, "wp_event", "")).startswith("cancel")
            ]
            assert cancel_lines == ["cancel_refused", "cancel_forwarded", "cancel_refused"]
            first, summary = logs.events("cancel_refused")
            assert first["count"] == 1 and first["source"] == "127.0.0.9"
            assert summary["reason"] == "summary" and summary["count"] == flood - 1
            assert summary["by_reason"] == "rate_limited=480,unidentified=19"
            assert summary["sources"] == "127.0.0.9"
            await env.assert_clean()


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
