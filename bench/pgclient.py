"""A tiny PostgreSQL v3 client in trio that binds its source address (so 127.0.0.N is
identity N for the stand-in) and logs in without a password, as Waypoint's clients do.

Used for the concurrency burst (many identities at once) and for holding idle sessions
(footprint). It speaks only what it needs: StartupMessage, AuthenticationOk, the messages up
to ReadyForQuery, ErrorResponse, Terminate.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence

import attrs
import trio

PROTOCOL_3_0 = 196608
_MAX_MESSAGE = 1 << 20


class LoginError(Exception):
    """The login did not reach ReadyForQuery (the message says why)."""


@attrs.frozen
class LoginResult:
    ok: bool
    seconds: float
    error: str = ""


def startup_message(user: str, database: str) -> bytes:
    body = struct.pack("!i", PROTOCOL_3_0)
    for key, value in (("user", user), ("database", database)):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _error_text(payload: bytes) -> str:
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return f"{fields.get('C', '?????')} {fields.get('M', '(no message)')}"


class _Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise LoginError("the server closed the connection during login")
            self._buf += chunk

    async def message(self) -> tuple[bytes, bytes]:
        await self._fill(5)
        kind = bytes(self._buf[:1])
        (length,) = struct.unpack("!i", self._buf[1:5])
        if not 4 <= length <= _MAX_MESSAGE:
            raise LoginError(f"bad message length {length} for {kind!r}")
        await self._fill(1 + length)
        payload = bytes(self._buf[5 : 1 + length])
        del self._buf[: 1 + length]
        return kind, payload


async def open_session(
    host: str, port: int, source: str, *, database: str, user: str = "bench"
) -> trio.SocketStream:
    """Connect from ``source``, log in, return the stream at ReadyForQuery (the caller closes
    it). Raises LoginError or OSError. The caller bounds the wait."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    try:
        await stream.send_all(startup_message(user, database))
        reader = _Reader(stream)
        while True:
            kind, payload = await reader.message()
            if kind == b"R":
                (code,) = struct.unpack("!i", payload[:4])
                if code != 0:
                    raise LoginError(f"the server asked for authentication (code {code})")
            elif kind == b"E":
                raise LoginError(_error_text(payload))
            elif kind == b"Z":
                return stream
            # S (ParameterStatus), K (BackendKeyData), N (notice), v (negotiate): skip
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def terminate(stream: trio.SocketStream) -> None:
    """Send Terminate and close (best effort)."""
    with trio.move_on_after(5):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(b"X\0\0\0\4")
    await trio.aclose_forcefully(stream)


async def timed_login(
    host: str, port: int, source: str, *, database: str, timeout: float
) -> LoginResult:
    """One login from ``source``: its duration (connect to ReadyForQuery) or its error."""
    start = time.perf_counter()
    try:
        with trio.fail_after(timeout):
            stream = await open_session(host, port, source, database=database)
    except trio.TooSlowError:
        return LoginResult(False, time.perf_counter() - start, f"no ReadyForQuery within {timeout:g} s")
    except (LoginError, OSError) as exc:
        return LoginResult(False, time.perf_counter() - start, str(exc) or type(exc).__name__)
    elapsed = time.perf_counter() - start
    await terminate(stream)
    return LoginResult(True, elapsed)


async def burst(
    host: str, port: int, sources: Sequence[str], per_source: int, *, database: str, timeout: float
) -> list[LoginResult]:
    """``per_source`` logins from each source, all started at once."""
    results: list[LoginResult] = []

    async def one(source: str) -> None:
        results.append(await timed_login(host, port, source, database=database, timeout=timeout))

    async with trio.open_nursery() as nursery:
        for _ in range(per_source):
            for source in sources:
                nursery.start_soon(one, source)
    return results


async def hold_sessions(
    host: str,
    port: int,
    sources: Sequence[str],
    count: int,
    *,
    database: str,
    batch: int,
    timeout: float,
) -> tuple[list[trio.SocketStream], list[str]]:
    """Open ``count`` sessions spread over ``sources``, ``batch`` at a time. Returns the open
    streams (the caller closes them with :func:`close_sessions`) and the errors."""
    streams: list[trio.SocketStream] = []
    errors: list[str] = []

    async def one(source: str) -> None:
        try:
            with trio.fail_after(timeout):
                streams.append(await open_session(host, port, source, database=database))
        except trio.TooSlowError:
            errors.append(f"no ReadyForQuery within {timeout:g} s")
        except (LoginError, OSError) as exc:
            errors.append(str(exc) or type(exc).__name__)

    for start in range(0, count, batch):
        async with trio.open_nursery() as nursery:
            for i in range(start, min(count, start + batch)):
                nursery.start_soon(one, sources[i % len(sources)])
    return streams, errors


async def close_sessions(streams: Sequence[trio.SocketStream]) -> None:
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(terminate, stream)
