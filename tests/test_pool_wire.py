"""The reset and the check over a backend stream (an in-memory stream stands in for the
backend; MockClock drives the bound)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import trio
import trio.testing

from waypoint.pgwire import (
    BackendKeyData,
    MessageReader,
    ParameterStatus,
    ReadyForQuery,
    build_error_response,
)
from waypoint.pgwire.framing import build_message
from waypoint.pool import (
    PooledBackendFailed,
    check,
    peek,
    reset,
    session_start,
    updated_parameters,
)
from waypoint.pool.wire import CHECK_QUERY

Answer = Callable[[str], bytes]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def complete(tag: str) -> bytes:
    return build_message(b"C", tag.encode() + b"\0")


IDLE = ReadyForQuery(b"I").encode()


async def _backend(stream: trio.abc.Stream, answer: Answer | None, seen: list[str]) -> None:
    """Reads one Query, records its text, sends ``answer(text)`` (None: never answers)."""
    reader = MessageReader()
    while True:
        msg = reader.next_message()
        if msg is None:
            data = await stream.receive_some(4096)
            if not data:
                return
            reader.feed(data)
            continue
        assert msg.type == b"Q"
        text = msg.body[:-1].decode()
        seen.append(text)
        if answer is None:
            await trio.sleep_forever()
        reply = answer(text)
        if reply:
            await stream.send_all(reply)
        else:
            await stream.aclose()
            return


async def _run(answer: Answer | None, query: str = "DISCARD ALL", bound: float = 2.0) -> object:
    ours, theirs = trio.testing.memory_stream_pair()
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_backend, theirs, answer, seen)
        try:
            return await reset(ours, query, bound)
        except PooledBackendFailed as exc:
            return exc
        finally:
            assert seen[:1] == [query]
            nursery.cancel_scope.cancel()


async def test_reset_collects_the_settings_the_backend_reports() -> None:
    answer = (
        ParameterStatus("application_name", "psql").encode()
        + ParameterStatus("is_superuser", "off").encode()
        + build_message(b"N", b"SNOTICE\0Mhello\0\0")
        + build_message(b"A", b"\0\0\0\x01chan\0payload\0")  # a leftover notification
        + complete("DISCARD ALL")
        + IDLE
    )
    result = await _run(lambda _: answer)
    assert not isinstance(result, Exception)
    assert result.parameters == (("application_name", "psql"), ("is_superuser", "off"))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (build_error_response("ERROR", "25001", "cannot run inside a transaction") + IDLE, "25001"),
        (complete("BEGIN") + ReadyForQuery(b"T").encode(), "not idle"),
        (ReadyForQuery(b"E").encode(), "not idle"),
        (build_message(b"G", b"\0\0\0"), "unexpected message b'G'"),  # CopyInResponse
        (build_message(b"H", b"\0\0\0"), "unexpected message b'H'"),  # CopyOutResponse
        (build_message(b"1"), "unexpected message b'1'"),  # ParseComplete: not a simple query
        (complete("DISCARD ALL") + IDLE + complete("X"), "more after ReadyForQuery"),
        (b"", "closed the connection"),
        (build_message(b"Z", b"Q"), "malformed answer"),
    ],
)
async def test_reset_fails_on_anything_but_an_idle_end(answer: bytes, fragment: str) -> None:
    result = await _run(lambda _: answer)
    assert isinstance(result, PooledBackendFailed)
    assert fragment in str(result)


async def test_reset_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    started = trio.current_time()
    result = await _run(None, bound=2.5)
    assert isinstance(result, PooledBackendFailed)
    assert "no answer within 2.5s" in str(result)
    assert trio.current_time() - started == pytest.approx(2.5)


async def test_reset_is_bounded_on_a_backend_that_answers_slowly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()

    async def trickle() -> None:
        await theirs.receive_some(4096)
        for byte in complete("DISCARD ALL"):
            await theirs.send_all(bytes([byte]))
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(PooledBackendFailed, match="no answer within 3s"):
            await reset(ours, "DISCARD ALL", 3)
        nursery.cancel_scope.cancel()


def _data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return build_message(b"D", body)


async def test_check_asks_for_the_roles_valid_until() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    seen: list[str] = []
    answer = (
        build_message(b"T", b"\0\0")
        + _data_row(b"1796000000.123456")
        + build_message(b"C", b"SELECT 1\0")
        + ParameterStatus("TimeZone", "UTC").encode()
        + IDLE
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_backend, theirs, lambda _: answer, seen)
        result = await check(ours, 1.0)
        nursery.cancel_scope.cancel()
    assert seen == [CHECK_QUERY]
    assert result.parameters == (("TimeZone", "UTC"),)
    assert result.valid_until == datetime(2026, 11, 30, 0, 53, 20, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    "rows",
    [
        b"",  # no such role
        _data_row(None),  # no VALID UNTIL
        _data_row(b"Infinity"),
        _data_row(b"not a number"),
        _data_row(b"1796000000") + _data_row(b"1796000000"),  # more than one row
        _data_row(),  # no column
    ],
)
async def test_a_check_answer_that_is_not_one_finite_time_has_no_valid_until(rows: bytes) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    answer = rows + build_message(b"C", b"SELECT 0\0") + IDLE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_backend, theirs, lambda _: answer, [])
        result = await check(ours, 1.0)
        nursery.cancel_scope.cancel()
    assert result.valid_until is None


async def test_a_data_row_shorter_than_it_says_fails_the_check() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    answer = build_message(b"D", struct.pack("!hi", 1, 10) + b"12") + IDLE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_backend, theirs, lambda _: answer, [])
        with pytest.raises(PooledBackendFailed, match="malformed"):
            await check(ours, 1.0)
        nursery.cancel_scope.cancel()


async def test_check_fails_on_a_backend_the_server_ended() -> None:
    fatal = build_error_response(
        "FATAL", "57P01", "terminating connection due to administrator command"
    )
    ours, theirs = trio.testing.memory_stream_pair()
    # The FATAL arrived while the backend waited in the pool (the server closes its end
    # after it; a TCP send to it still succeeds, which the memory stream cannot show).
    await theirs.send_all(fatal)
    with pytest.raises(PooledBackendFailed, match="57P01"):
        await check(ours, 1.0)


@pytest.fixture
def sockets() -> Iterator[tuple[trio.socket.SocketType, socket.socket]]:
    """A pooled backend's socket (Waypoint's end, as trio holds it) and the server's end."""
    ours, theirs = socket.socketpair()
    with trio.socket.from_stdlib_socket(ours) as held, theirs:
        yield held, theirs


def test_peek_passes_a_quiet_backend(
    sockets: tuple[trio.socket.SocketType, socket.socket],
) -> None:
    held, _ = sockets
    peek(held)
    peek(held)


@pytest.mark.parametrize(
    ("sent", "close", "fragment"),
    [
        (b"", True, "closed the connection"),
        (
            build_error_response(
                "FATAL", "57P01", "terminating connection due to administrator command"
            ),
            True,
            "sent data while it was pooled",
        ),
        (build_message(b"A", b"\0\0\0\x01chan\0payload\0"), False, "sent data while"),
        (build_message(b"N", b"SNOTICE\0Mhello\0\0"), False, "sent data while"),
    ],
)
def test_peek_fails_a_backend_that_closed_or_spoke_unasked(
    sockets: tuple[trio.socket.SocketType, socket.socket], sent: bytes, close: bool, fragment: str
) -> None:
    held, theirs = sockets
    if sent:
        theirs.sendall(sent)
    if close:
        theirs.close()
    with pytest.raises(PooledBackendFailed, match=fragment):
        peek(held)
    if sent:
        # A peek: what was sent is still there to read (it is not taken from the socket).
        with socket.socket(fileno=held.fileno()) as raw:
            try:
                assert raw.recv(len(sent) + 1, socket.MSG_DONTWAIT) == sent
            finally:
                raw.detach()


def test_session_start_for_a_pooled_client() -> None:
    held = updated_parameters(
        {"application_name": "first", "TimeZone": "UTC"}, [("application_name", "")]
    )
    assert held == {"application_name": "", "TimeZone": "UTC"}
    raw = session_start(held, BackendKeyData(4242, b"\x01" * 32))
    reader = MessageReader()
    reader.feed(raw)
    types = []
    while (msg := reader.next_message()) is not None:
        types.append(msg.type)
    assert types == [b"S", b"S", b"K", b"Z"]
    assert raw.endswith(IDLE)
    assert BackendKeyData(4242, b"\x01" * 32).encode() in raw
