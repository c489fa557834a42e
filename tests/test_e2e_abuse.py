"""Hostile and idle connections (docs/protocol.md): 200 idle sockets and garbage senders do not stop a
normal client; the handshake timeout frees them (the server closes every one)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio
from e2e_support import E2EEnv, create_app_database, e2e_env
from pgcluster import PgCluster

IDLE = 200


async def _wait_closed(stream: trio.SocketStream, closed: list[float], started: float) -> None:
    """Read until the server closes (EOF or reset); record when."""
    try:
        while await stream.receive_some(4096):
            pass
    except trio.BrokenResourceError:
        pass
    closed.append(trio.current_time() - started)


def _garbage() -> list[bytes]:
    startup = struct.pack("!i", 196608) + b"user\0x\0database\0y\0\0"
    return [
        os.urandom(512),
        struct.pack("!i", 0x7FFFFFF0) + b"\0\0\0\0",  # a huge length word
        struct.pack("!i", len(startup) + 4) + startup[:10],  # half a startup packet
        struct.pack("!i", 8),  # a length word, then nothing
        b"\x16\x03\x01\x00\x05\x01\x00",  # the start of a TLS record, never finished
    ]


async def test_idle_and_garbage_sockets_neither_block_clients_nor_linger(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    with trio.fail_after(60):
        # The idle sockets and the client share 127.0.0.1: the per-address cap on handshakes
        # (tests/test_e2e_admission.py) is raised above IDLE so that this test sees what the
        # handshake timeout alone does.
        async with e2e_env(
            pg,
            tmp_path,
            handshake_timeout="2s",
            tables_extra="[admission]\nmax_handshakes_per_address = 1000\n",
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            await _abuse(env, db)
            await env.assert_clean()


async def _abuse(env: E2EEnv, db: str) -> None:
    closed: list[float] = []
    streams: list[trio.SocketStream] = []
    started = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(IDLE):
                s = await trio.open_tcp_stream(env.host, env.port)
                streams.append(s)
                nursery.start_soon(_wait_closed, s, closed, started)
            for data in _garbage():
                s = await trio.open_tcp_stream(env.host, env.port)
                streams.append(s)
                await s.send_all(data)
                nursery.start_soon(_wait_closed, s, closed, started)

            # Meanwhile a normal client gets through at once.
            t0 = trio.current_time()
            r = await env.psql("select v from t", db, timeout=10)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "one"
            assert trio.current_time() - t0 < 5
            # The handshake timeout (2 s) closes every one of them.
            with trio.fail_after(10):
                while len(closed) < len(streams):
                    await trio.sleep(0.1)
    finally:
        for s in streams:
            await s.aclose()
    assert len(closed) == IDLE + len(_garbage())
    # Garbage that is recognizably bad is closed at once; the rest at the 2 s deadline.
    assert max(closed) < 8, max(closed)
    assert sum(1 for t in closed if t >= 1.5) >= IDLE
