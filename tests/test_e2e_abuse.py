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
#: Long enough that the normal client is surely done before any idle socket is closed.
HANDSHAKE_TIMEOUT = 10.0


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
    with trio.fail_after(90):
        # The idle sockets and the client share 127.0.0.1: the per-address cap on handshakes
        # (tests/test_e2e_admission.py) is raised above IDLE so that this test sees what the
        # handshake timeout alone does.
        async with e2e_env(
            pg,
            tmp_path,
            handshake_timeout=f"{HANDSHAKE_TIMEOUT:g}s",
            tables_extra="[admission]\nmax_handshakes_per_address = 1000\n",
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            await _abuse(env, db)
            await env.assert_clean()


async def _abuse(env: E2EEnv, db: str) -> None:
    idle_closed: list[float] = []
    garbage_closed: list[float] = []
    streams: list[trio.SocketStream] = []
    started = trio.current_time()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(IDLE):
                s = await trio.open_tcp_stream(env.host, env.port)
                streams.append(s)
                nursery.start_soon(_wait_closed, s, idle_closed, started)
            for data in _garbage():
                s = await trio.open_tcp_stream(env.host, env.port)
                streams.append(s)
                await s.send_all(data)
                nursery.start_soon(_wait_closed, s, garbage_closed, started)

            # Meanwhile a normal client gets through: it is done while every idle socket is
            # still held open (none of them has reached the handshake timeout yet).
            r = await env.psql("select v from t", db)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "one"
            assert idle_closed == []
            # The handshake timeout closes every one of them.
            with trio.fail_after(HANDSHAKE_TIMEOUT * 3):
                while len(idle_closed) + len(garbage_closed) < len(streams):
                    await trio.sleep(0.1)
    finally:
        for s in streams:
            await s.aclose()
    assert len(idle_closed) == IDLE and len(garbage_closed) == len(_garbage())
    # An idle socket is closed by the handshake timeout, never before it.
    assert min(idle_closed) >= HANDSHAKE_TIMEOUT, min(idle_closed)
