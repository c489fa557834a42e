"""The relay's state machine (waypoint/proxy/relay/core.py), with no sockets and no clock:
counts and budget, the FATAL at a message boundary, flush-then-finish, the verdict.

The same core runs under the C-backed lanes of the epoll engine (``_pump.Lane``) and the
pure-Python ``TrackedDirection`` of the stream relay; the property tests drive both with the
same inputs and compare every answer.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.proxy.relay._pump import Lane
from waypoint.proxy.relay.core import NO_LIMIT, TERMINATING, Direction, RelayCore, TrackedDirection


def message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


FATAL = message(b"E", b"SFATAL\x00C57P01\x00Mbye\x00\x00")
LIMIT = message(b"E", b"SFATAL\x00C53400\x00Mlim\x00\x00")
ROW = message(b"D", b"\x00\x01\x00\x00\x00\x03abc")


@pytest.fixture
def fd() -> Iterator[int]:
    a, b = socket.socketpair()
    yield a.fileno()
    a.close()
    b.close()


def python_pair() -> tuple[Direction, Direction]:
    return TrackedDirection(), TrackedDirection()


def make_lane_pair(fd: int) -> Callable[[], tuple[Direction, Direction]]:
    def pair() -> tuple[Direction, Direction]:
        client, backend = Lane(fd), Lane(fd)
        client.link(backend)
        return client, backend

    return pair


@pytest.fixture(params=["python", "lanes"])
def pair(request: pytest.FixtureRequest, fd: int) -> Callable[[], tuple[Direction, Direction]]:
    return python_pair if request.param == "python" else make_lane_pair(fd)


def core_of(pair: Callable[[], tuple[Direction, Direction]], **kw: object) -> RelayCore:
    client, backend = pair()
    return RelayCore(client, backend, **kw)  # type: ignore[arg-type]


def test_reads_are_counted_tracked_and_passed_on(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core = core_of(pair)
    q = message(b"Q", b"select 1\x00")
    assert core.read(core.client, q[:3], 0.0) == q[:3]
    assert core.read(core.client, q[3:], 0.0) == q[3:]
    assert core.read(core.backend, ROW * 2, 0.0) == ROW * 2
    assert core.budget == NO_LIMIT - len(q) - 2 * len(ROW)
    result = core.end()
    assert (result.bytes_from_client, result.messages_from_client) == (len(q), 1)
    assert (result.bytes_from_backend, result.messages_from_backend) == (2 * len(ROW), 2)
    assert result.reason == "terminated" and not result.fatal_sent


def test_the_byte_limit_is_shared_and_not_crossed_by_exactly_max_bytes(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    q = message(b"Q", b"x\x00")
    core = core_of(pair, max_bytes=len(q) + len(ROW), byte_limit_error=LIMIT)
    assert core.read(core.client, q, 0.0) == q
    assert core.read(core.backend, ROW, 0.0) == ROW
    assert not core.terminating and core.budget == 0
    assert core.read(core.client, q, 1.0) == b""  # past the limit: dropped
    assert core.terminating and core.reason == "byte_limit" and core.budget == TERMINATING
    assert core.fatal_due  # the backend stream is at a boundary: the FATAL goes now
    assert core.take_fatal(1.0) == LIMIT
    assert core.closing and not core.fatal_due
    core.client_drained()
    result = core.end()
    assert result.reason == "byte_limit" and result.fatal_sent
    assert result.bytes_from_client == 2 * len(q)


def test_backend_bytes_past_the_end_go_on_only_up_to_the_next_boundary(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core = core_of(pair)
    big = message(b"D", bytes(1000))
    assert core.read(core.backend, big[:100], 0.0) == big[:100]
    assert core.terminate(FATAL, "terminated", 2.0, 10.0)
    assert not core.fatal_due  # mid-message
    assert core.deadline == 12.0
    assert core.read(core.client, message(b"Q", b"drop\x00"), 10.0) == b""  # never forwarded
    rest = big[100:] + ROW
    assert core.read(core.backend, rest, 10.5) == big[100:]  # up to the boundary only
    assert core.fatal_due
    assert core.take_fatal(10.5) == FATAL
    assert core.read(core.backend, ROW, 10.6) == b""  # after the FATAL: dropped
    assert core.deadline == 12.5  # the queued FATAL gets its own flush bound


def test_a_backend_chunk_that_starts_after_the_decided_boundary_is_dropped(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core = core_of(pair, max_bytes=len(ROW), byte_limit_error=LIMIT)
    assert core.read(core.backend, ROW, 0.0) == ROW
    assert core.read(core.backend, ROW, 0.0) == b""  # crosses the limit at a boundary
    assert core.fatal_due


def test_the_first_end_wins(pair: Callable[[], tuple[Direction, Direction]]) -> None:
    core = core_of(pair)
    assert core.terminate(FATAL, "terminated", 1.0, 0.0)
    assert not core.terminate(LIMIT, "byte_limit", 1.0, 0.0)
    assert core.fatal == FATAL
    core.closed(core.client, 0.5, "client socket: reset")
    assert core.end("error", "later").reason == "terminated"
    assert core.end().error == "client socket: reset"  # idempotent


def test_eof_and_errors_close_with_a_flush_bound(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core = core_of(pair)
    core.closed(core.backend, 5.0)
    assert core.closing and core.reason == "backend_closed" and core.deadline == 7.0
    assert not core.expired(6.9) and core.expired(7.0)
    other = core_of(pair)
    other.closed(other.client, 0.0, "client TLS: BAD_RECORD_MAC", gone=False)
    assert other.end().reason == "error"
    assert other.end().error == "client TLS: BAD_RECORD_MAC"


def test_a_malformed_length_ends_the_relay_with_an_error(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core = core_of(pair)
    assert core.read(core.backend, b"D\x00\x00\x00\x02", 0.0) == b""
    assert core.done
    assert core.result is not None and core.result.reason == "error"
    assert "backend: invalid message length 2" in (core.result.error or "")


def test_handshake_leftovers_count_and_can_begin_the_end(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    leftover = message(b"S", b"a\x00b\x00") + message(b"Z", b"I")
    core = core_of(pair, max_bytes=len(leftover) - 1, byte_limit_error=LIMIT)
    core.start(leftover, b"", 0.0)
    assert core.reason == "byte_limit" and core.fatal_due
    assert core.backend.received == len(leftover) and core.backend.messages == 2


def test_the_driver_can_force_its_own_failure(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core = core_of(pair)
    core.closed(core.client, 0.0)
    assert core.end("error", "engine failed", force=True).reason == "error"


_chunks = st.lists(
    st.tuples(
        st.sampled_from(["client", "backend", "terminate", "fatal?"]),
        st.lists(
            st.sampled_from([ROW, message(b"Q", b"x\x00"), message(b"D", bytes(300))]), max_size=4
        ),
        st.integers(0, 50),
    ),
    max_size=30,
)


@given(steps=_chunks, limit=st.sampled_from([0, 100, 700, 5000]))
def test_the_c_lanes_and_the_python_directions_give_the_same_answers(
    steps: list[tuple[str, list[bytes], int]], limit: int
) -> None:
    """One core over the engine's C lanes, one over the stream relay's Python trackers:
    the same inputs give the same outputs, state and verdict."""
    a, b = socket.socketpair()
    try:
        kw: dict[str, object] = {"max_bytes": limit, "byte_limit_error": LIMIT} if limit else {}
        cores = [core_of(python_pair, **kw), core_of(make_lane_pair(a.fileno()), **kw)]
        for kind, msgs, cut in steps:
            data = b"".join(msgs)
            answers = []
            for core in cores:
                if kind == "terminate":
                    answers.append(core.terminate(FATAL, "terminated", 1.0, 0.0))
                elif kind == "fatal?":
                    answers.append(core.take_fatal(0.0) if core.fatal_due else None)
                else:
                    side = core.client if kind == "client" else core.backend
                    # Cut the data so that headers straddle reads.
                    parts = [data[:cut], data[cut:]] if data else []
                    answers.append([core.read(side, p, 0.0) for p in parts if p])
                answers.append(
                    (core.budget, core.terminating, core.fatal_due, core.closing, core.done)
                )
            assert answers[: len(answers) // 2] == answers[len(answers) // 2 :]
        assert cores[0].end() == cores[1].end()
    finally:
        a.close()
        b.close()


# -- the pool's question: did the session end in step, the backend idle? --------------------

Q = message(b"Q", b"select 1\x00")
SYNC = message(b"S", b"")
TERM = message(b"X", b"")
DONE = message(b"C", b"SELECT 1\x00")


def ready(status: bytes) -> bytes:
    return message(b"Z", status)


def _session(
    pair: Callable[[], tuple[Direction, Direction]],
    steps: list[tuple[str, bytes]],
    *,
    stop: bool = True,
    end: str = "client",
) -> tuple[RelayCore, bytes]:
    """Drive a core through ``steps`` (("c", bytes from the client) / ("b", from the
    backend)); returns it, ended by ``end`` closing, and what was passed to the backend."""
    core = core_of(pair, stop_at_terminate=stop)
    to_backend = b""
    for who, data in steps:
        side = core.client if who == "c" else core.backend
        out = core.read(side, data, 0.0)
        if who == "c":
            to_backend += out
    core.closed(core.client if end == "client" else core.backend, 1.0)
    core.end()
    return core, to_backend


@pytest.mark.parametrize(
    ("steps", "status"),
    [
        ([("c", Q), ("b", DONE + ready(b"I")), ("c", TERM)], b"I"),
        ([("c", TERM)], b"I"),  # nothing asked after the login
        ([("c", Q), ("b", DONE + ready(b"T")), ("c", TERM)], b"T"),  # inside a transaction
        ([("c", Q), ("b", DONE + ready(b"E")), ("c", TERM)], b"E"),  # a failed transaction
        ([("c", Q + TERM)], None),  # left before the answer came
        ([("c", Q + TERM), ("b", DONE + ready(b"I"))], b"I"),  # ... which came before the EOF
        ([("c", Q), ("c", Q), ("b", DONE + ready(b"I")), ("c", TERM)], None),  # one pending
        ([("c", Q), ("b", DONE), ("c", TERM)], None),  # results still coming
        ([("c", Q), ("b", message(b"E", b"SERROR\x00\x00") + ready(b"I")), ("c", TERM)], None),
        ([("c", Q), ("b", DONE + ready(b"I") + message(b"A", b"\x00" * 6)), ("c", TERM)], None),
        ([("c", Q), ("b", message(b"G", b"\x00\x00\x00")), ("c", TERM)], None),  # COPY IN
        (
            [("c", message(b"P", b"\x00x\x00\x00\x00")), ("b", message(b"1", b"")), ("c", TERM)],
            None,
        ),
        (
            [
                ("c", message(b"P", b"\x00x\x00\x00\x00") + SYNC),
                ("b", message(b"1", b"") + ready(b"I")),
                ("c", TERM),
            ],
            b"I",
        ),
        ([("c", Q), ("b", DONE + ready(b"I")), ("c", TERM[:2]), ("c", TERM[2:])], None),  # split
        ([("c", Q), ("b", DONE + ready(b"I")), ("c", TERM + b"Q")], None),  # bytes after it
        ([("c", Q), ("b", DONE + ready(b"I")), ("c", TERM), ("c", Q)], None),  # more after it
    ],
)
def test_ready_status_only_for_a_session_that_ended_in_step(
    pair: Callable[[], tuple[Direction, Direction]],
    steps: list[tuple[str, bytes]],
    status: bytes | None,
) -> None:
    core, to_backend = _session(pair, steps)
    assert core.result is not None and core.result.reason == "client_closed"
    assert core.result.ready_status == status
    sent_terminate = to_backend.endswith(TERM) or TERM in to_backend
    if status is not None:
        assert not sent_terminate  # held back: the backend waits for its next query
        assert to_backend == b"".join(d for w, d in steps if w == "c")[: -len(TERM)]


def test_without_stop_at_terminate_it_is_passed_on_and_no_status_is_given(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core, to_backend = _session(
        pair, [("c", Q), ("b", DONE + ready(b"I")), ("c", TERM)], stop=False
    )
    assert to_backend == Q + TERM
    assert core.result is not None and core.result.ready_status is None


def test_no_status_when_the_backend_or_a_limit_ended_it(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    core, _ = _session(pair, [("c", Q), ("b", DONE + ready(b"I"))], end="backend")
    assert core.result is not None and core.result.ready_status is None
    core = core_of(pair, stop_at_terminate=True)
    core.read(core.client, Q, 0.0)
    core.read(core.backend, DONE + ready(b"I"), 0.0)
    core.terminate(FATAL, "terminated", 2.0, 0.0)
    core.read(core.client, TERM, 0.0)
    core.closed(core.client, 1.0)
    assert core.end().ready_status is None



def test_a_backend_closing_after_the_clients_terminate_is_the_client_closing(
    pair: Callable[[], tuple[Direction, Direction]],
) -> None:
    """Without stop_at_terminate the client's Terminate goes on to the backend, which then
    closes, often before the client does: the client ended the session all the same. A
    Terminate not yet whole, or a query after it, is no such end; nor is a failure of ours."""

    def backend_ends(client_sent: list[bytes], error: str | None = None, gone: bool = True) -> str:
        core = core_of(pair)
        for chunk in client_sent:
            assert core.read(core.client, chunk, 0.0) == chunk  # passed on, Terminate too
        core.closed(core.backend, 1.0, error, gone=gone)
        return core.end().reason

    assert backend_ends([Q, TERM]) == "client_closed"
    assert backend_ends([TERM]) == "client_closed"
    assert backend_ends([Q + TERM], "backend socket: [Errno 104] reset") == "client_closed"
    assert backend_ends([Q, TERM[:3]]) == "backend_closed"
    assert backend_ends([TERM + Q]) == "backend_closed"
    assert backend_ends([Q]) == "backend_closed"
    assert backend_ends([TERM], "backend TLS: bad record", gone=False) == "error"
