"""``waypoint sessions`` and ``waypoint lock``: thin console clients (PostgreSQL 15 and 18). The
console decides; the CLI quotes values, prints the answer, and exits 1 with the SQLSTATE when
the console refuses."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from console_support import admin_rule
from e2e_support import E2EEnv, RawSession, create_app_database, e2e_env
from pgcluster import PgCluster

from waypoint.cli import lock, sessions
from waypoint.cli.main import build_parser, main

VICTIM = "o'neil@example.com"  # a quote in the login: the CLI must quote it


async def _cli(env: E2EEnv, *argv: str, process: bool = False) -> subprocess.CompletedProcess[str]:
    """``waypoint ARGV`` against ``env``'s listener: as a process, or ``main()`` in a thread
    with standard output and error captured (faster; nothing else prints meanwhile)."""
    full = [argv[0], "--host", env.host, "--port", str(env.port), *argv[1:]]
    if process:
        cmd = [sys.executable, "-m", "waypoint.cli.main", *full]

        def spawn() -> subprocess.CompletedProcess[str]:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ), stdin=subprocess.DEVNULL)

        return await trio.to_thread.run_sync(spawn)

    def call() -> subprocess.CompletedProcess[str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(full)
        return subprocess.CompletedProcess(full, code, out.getvalue(), err.getvalue())

    return await trio.to_thread.run_sync(call)


def test_statements_are_quoted() -> None:
    parser = build_parser()
    args = parser.parse_args(["lock", "a'b", "--node", "n", "--for", "1h", "--reason", "it's over"])
    assert lock.statement(args) == "LOCK LOGIN 'a''b' NODE 'n' FOR '1h' REASON 'it''s over'"
    args = parser.parse_args(["lock", "a", "--unlock"])
    assert lock.statement(args) == "UNLOCK LOGIN 'a'"
    args = parser.parse_args(["sessions", "--kill-login", "x'y", "--node", "n"])
    assert sessions.statement(args) == "KILL LOGIN 'x''y' NODE 'n'"
    assert sessions.statement(parser.parse_args(["sessions"])) == "SHOW SESSIONS"
    args = parser.parse_args(["lock", "a", "--node-id", "nX'1", "--reason", "r"])
    assert lock.statement(args) == "LOCK LOGIN 'a' NODE ID 'nX''1' REASON 'r'"
    args = parser.parse_args(["lock", "a", "--node-id", "n1", "--unlock"])
    assert lock.statement(args) == "UNLOCK LOGIN 'a' NODE ID 'n1'"
    args = parser.parse_args(["sessions", "--kill-login", "x", "--node-id", "n1"])
    assert sessions.statement(args) == "KILL LOGIN 'x' NODE ID 'n1'"
    with pytest.raises(SystemExit):  # a name or a stable id, not both
        parser.parse_args(["lock", "a", "--node", "n", "--node-id", "n1", "--reason", "r"])


async def test_sessions_and_lock_commands(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    with trio.fail_after(240):
        async with e2e_env(pg, tmp_path) as env:
            env.grant("127.0.0.1", rules=[admin_rule()], login="admin@example.com", node="ops")
            env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}}, login=VICTIM, node="box")
            raw = await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source="127.0.0.2"))
            try:
                r = await _cli(env, "sessions", "--json", process=True)
                assert r.returncode == 0, r.stderr
                [row] = [json.loads(line) for line in r.stdout.splitlines() if VICTIM in line]
                assert row["database"] == db and row["node"] == "box"

                r = await _cli(env, "sessions")
                assert r.returncode == 0 and r.stdout.startswith("conn_id") and VICTIM in r.stdout

                r = await _cli(env, "lock", VICTIM, "--for", "1h", "--reason", "it's over")
                assert r.returncode == 0, r.stderr
                fields = await trio.to_thread.run_sync(lambda: raw.read_until_closed(timeout=10))
                assert fields["C"] == "57P01" and "it's over" in fields["M"]
            finally:
                raw.close()

            r = await _cli(env, "lock", "--list")
            assert r.returncode == 0 and VICTIM in r.stdout and "it's over" in r.stdout
            r = await _cli(env, "lock", VICTIM, "--unlock")
            assert r.returncode == 0, r.stderr

            # A read-only caller: the console refuses, the CLI says so and exits 1.
            env.grant("127.0.0.1", rules=[admin_rule("read")], login="admin@example.com", node="ops")
            r = await _cli(env, "sessions", "--kill-login", VICTIM)
            assert r.returncode == 1 and "42501" in r.stderr
