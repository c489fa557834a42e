"""The stand-in as a separate process (as subprocess end-to-end tests and the bench use it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from waypoint.config.model import IdentityConfig
from waypoint.identity import PeerNotFound, TailscaleProvider

STANDIN = Path(__file__).with_name("localapi_standin.py")
CAP = "redo.com/cap/waypoint"


def write_peers(path: Path, peers: list[dict[str, Any]], **extra: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"peers": peers, **extra}))
    os.replace(tmp, path)


class StandinProcess:
    def __init__(self, proc: trio.Process, socket_path: str, peers: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.peers = peers
        self.provider = TailscaleProvider(
            IdentityConfig(socket=socket_path, capability=CAP, timeout=2.0)
        )

    async def login_of(self, ip: str) -> str:
        return (await self.provider.whois(ip, 1)).login

    async def wait_for_login(self, ip: str, login: str, within: float = 5.0) -> None:
        with trio.fail_after(within):
            while True:
                with contextlib.suppress(PeerNotFound):
                    if await self.login_of(ip) == login:
                        return
                await trio.sleep(0.05)


@pytest.fixture
async def standin_process() -> AsyncIterator[StandinProcess]:
    with tempfile.TemporaryDirectory(prefix="ts-") as d:
        sock = os.path.join(d, "tailscaled.sock")
        peers = Path(d) / "peers.json"
        write_peers(peers, [{"ip": "127.0.0.2", "login": "alice@example.com", "node": "alice"}])
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(STANDIN), "--socket", sock, "--peers", str(peers)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = b""
            with trio.fail_after(15):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(1)
                    assert chunk, "stand-in exited before it was ready"
                    line += chunk
            assert line.decode().strip() == f"ready {sock}"
            yield StandinProcess(proc, sock, peers)
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()


async def test_standin_process_serves_the_peers_file(standin_process: StandinProcess) -> None:
    assert await standin_process.login_of("127.0.0.2") == "alice@example.com"


async def test_standin_process_reloads_when_the_file_changes(
    standin_process: StandinProcess,
) -> None:
    write_peers(
        standin_process.peers,
        [
            {"ip": "127.0.0.2", "login": "alice@example.com", "node": "alice", "rules": [{"x": 1}]},
            {"ip": "127.0.0.3", "login": "bob@example.com", "node": "bob"},
        ],
    )
    await standin_process.wait_for_login("127.0.0.3", "bob@example.com")
    assert (await standin_process.provider.whois("127.0.0.2", 1)).rules == ({"x": 1},)


async def test_standin_process_reloads_on_sighup(standin_process: StandinProcess) -> None:
    path = standin_process.peers
    before = path.stat()
    # Same size, and the old mtime put back: only SIGHUP can reveal the change.
    write_peers(path, [{"ip": "127.0.0.2", "login": "alina@example.com", "node": "alice"}])
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    await trio.sleep(0.3)
    assert await standin_process.login_of("127.0.0.2") == "alice@example.com"
    standin_process.proc.send_signal(signal.SIGHUP)
    await standin_process.wait_for_login("127.0.0.2", "alina@example.com")


async def test_standin_process_keeps_old_table_on_a_bad_file(
    standin_process: StandinProcess,
) -> None:
    tmp = standin_process.peers.with_suffix(".tmp")
    tmp.write_text('{"peers": [')
    os.replace(tmp, standin_process.peers)
    await trio.sleep(0.4)
    assert await standin_process.login_of("127.0.0.2") == "alice@example.com"


async def test_standin_process_stops_cleanly_on_sigterm(standin_process: StandinProcess) -> None:
    standin_process.proc.terminate()
    with trio.fail_after(5):
        code = await standin_process.proc.wait()
    assert code == 0
    assert not os.path.exists(standin_process.socket_path)
