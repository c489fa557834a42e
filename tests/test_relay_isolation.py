"""Relay isolation: one session's bytes never reach another session, whatever mix of relays
shares the engine (C-pumped plain, client TLS, header hooks on either side) and however
back-pressure interleaves their events in one epoll batch.

Every session sends a stream of messages whose bodies carry its own marker; each peer
checks that what it received is exactly, byte for byte, what its own counterpart sent.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import socket
import zlib
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_relay import _pair, _stream, _tls_pair, assert_tls_path, message

from waypoint.proxy.relay import (
    RelayEngine,
    RelayHandle,
    RelayResult,
    open_relay_engine,
)

#: The relay kinds: how the client side is served, and which sides have a header hook.
#: "tls": the client's TLS record layer in the C loop; "tls-hooked": in C, driven from
#: the Python read path (hooks); "tls-py": the Python record layer (the fallback).
KINDS = ("plain", "tls", "hook-client", "hook-backend", "tls-hooked", "tls-py")


def session_stream(marker: bytes, direction: bytes, size: int, rng: random.Random) -> bytes:
    """About ``size`` bytes of messages; every body is ``marker`` + direction + a counter,
    repeated, so that a stray byte from any other session is visible in a diff."""
    parts, total, i = [], 0, 0
    while total < size:
        stamp = marker + direction + b"%06d." % i
        body = stamp * rng.choice([1, 3, 40, 700, 3000])
        parts.append(message(b"D" if direction == b"<" else b"d", body))
        total += len(parts[-1])
        i += 1
    return b"".join(parts)


@attrs.define
class Live:
    marker: bytes
    kind: str
    client: trio.abc.Stream
    backend: trio.abc.Stream
    handle: RelayHandle
    socks: tuple[socket.socket, socket.socket]
    up: bytes
    down: bytes
    got_up: bytearray = attrs.field(factory=bytearray)
    got_down: bytearray = attrs.field(factory=bytearray)


async def open_session(engine: RelayEngine, kind: str, marker: bytes, size: int, seed: int) -> Live:
    """A relay of ``kind`` over small TCP buffers (so back-pressure comes early)."""
    client_app, client_proxy = _pair("tcp", 4096)
    backend_proxy, backend_app = _pair("tcp", 4096)
    kw: dict[str, Any] = {}
    if kind in ("hook-client", "tls-hooked"):
        kw["on_client_header"] = lambda t, n: None
    if kind in ("hook-backend", "tls-hooked"):
        kw["on_backend_header"] = lambda t, n: None
    rng = random.Random(seed)
    up = session_stream(marker, b">", size, rng)
    down = session_stream(marker, b"<", size, rng)
    if kind.startswith("tls"):
        app, proxy = await _tls_pair(client_app, client_proxy)
        handover = proxy.handover()
        raw = proxy.transport_stream
        assert isinstance(raw, trio.SocketStream)
        tls_sock = socket.socket(fileno=raw.socket.detach())
        in_c = kind != "tls-py"
        handle = engine.start_relay(tls_sock, backend_proxy, client_tls=handover, c_tls=in_c, **kw)
        assert_tls_path(handle, in_c=in_c)
        return Live(marker, kind, app, _stream(backend_app), handle, (tls_sock, backend_proxy), up, down)
    handle = engine.start_relay(client_proxy, backend_proxy, **kw)
    return Live(
        marker, kind, _stream(client_app), _stream(backend_app), handle,
        (client_proxy, backend_proxy), up, down,
    )


async def _send(stream: trio.abc.Stream, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice([100, 5000, 70_000])
        await stream.send_all(data[pos : pos + n])
        pos += n
        if rng.random() < 0.2:
            await trio.sleep(0)


async def _receive(stream: trio.abc.Stream, into: bytearray, n: int, rng: random.Random, slow: bool) -> None:
    while len(into) < n:
        data = await stream.receive_some(rng.choice([512, 4096, 65536]))
        if not data:
            return
        into += data
        if slow and rng.random() < 0.3:
            await trio.sleep(0.001)  # a slow reader: the relay toward it backs up


def check_own_bytes(live: Live) -> None:
    """Every byte each peer received came from its own counterpart, in order."""
    for got, sent, who in ((live.got_up, live.up, "backend"), (live.got_down, live.down, "client")):
        if hashlib.sha256(got).digest() == hashlib.sha256(sent).digest():
            continue
        at = next((i for i, (x, y) in enumerate(zip(got, sent, strict=False)) if x != y), None)
        if at is None:
            pytest.fail(
                f"{live.kind} session {live.marker!r}: its {who} received {len(got)} bytes, "
                f"not the {len(sent)} its counterpart sent"
            )
        pytest.fail(
            f"{live.kind} session {live.marker!r}: its {who} received foreign bytes at offset "
            f"{at}: {bytes(got[at : at + 48])!r} instead of {sent[at : at + 48]!r}"
        )


async def run_mixed(kinds: list[str], size: int, seed: int) -> list[RelayResult]:
    rng = random.Random(seed)
    results: list[RelayResult] = []
    async with open_relay_engine(recv_buffer_size=16384) as engine:
        lives = [
            await open_session(engine, kind, b"S%03d-%s" % (i, kind.encode()), size, rng.randrange(1 << 30))
            for i, kind in enumerate(kinds)
        ]
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for live in lives:
                    r = random.Random(rng.randrange(1 << 30))
                    slow_client, slow_backend = r.random() < 0.5, r.random() < 0.5
                    nursery.start_soon(_send, live.client, live.up, random.Random(r.random()))
                    nursery.start_soon(_send, live.backend, live.down, random.Random(r.random()))
                    nursery.start_soon(
                        _receive, live.backend, live.got_up, len(live.up), random.Random(r.random()), slow_backend
                    )
                    nursery.start_soon(
                        _receive, live.client, live.got_down, len(live.down), random.Random(r.random()), slow_client
                    )
            for live in lives:
                check_own_bytes(live)
            for live in lives:
                await live.client.aclose()
            for live in lives:
                results.append(await live.handle.wait())
        for live in lives:
            await live.backend.aclose()
            for s in live.socks:
                s.close()
    return results


@pytest.mark.parametrize(
    ("a", "b"), list(itertools.combinations_with_replacement(KINDS, 2)), ids=[f"{a}+{b}" for a, b in itertools.combinations_with_replacement(KINDS, 2)]
)
async def test_mixed_relays_under_back_pressure_get_only_their_own_bytes(a: str, b: str) -> None:
    kinds = [a, b] * 2
    results = await run_mixed(kinds, 40_000, zlib.crc32(f"{a}+{b}".encode()))
    for result in results:
        assert result.reason == "client_closed", result


async def test_every_kind_at_once_under_back_pressure_gets_only_its_own_bytes() -> None:
    results = await run_mixed(list(KINDS) * 2, 60_000, 7)
    assert [r.reason for r in results] == ["client_closed"] * len(results)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=8),
    size=st.integers(1, 40_000),
    seed=st.integers(0, 1 << 30),
)
def test_random_interleavings_keep_every_session_to_its_own_bytes(kinds: list[str], size: int, seed: int) -> None:
    trio.run(run_mixed, kinds, size, seed)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 200 examples of up to 16 relays: ~10 minutes on this machine
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=16),
    size=st.integers(1, 400_000),
    seed=st.integers(0, 1 << 30),
)
def test_many_random_interleavings_keep_every_session_to_its_own_bytes(
    kinds: list[str], size: int, seed: int
) -> None:
    trio.run(run_mixed, kinds, size, seed)
