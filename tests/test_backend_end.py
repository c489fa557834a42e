"""``stop_backend``: the escalation a session's end follows, against a socket pair standing in
for the backend connection (no PostgreSQL): Terminate (our end of the stream), then a
CancelRequest, then the admin's ``pg_terminate_backend``; each step only when the backend has
not closed its end yet. Time is trio's autojump clock."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from waypoint.proxy.backend_end import stop_backend


class FakeBackend:
    """The server end: closes its socket on EOF (idle), after a cancel (busy), or never
    (stuck). Records what Waypoint did, in order."""

    def __init__(self, sock: trio.socket.SocketType, behaviour: str) -> None:
        self.sock = sock
        self.behaviour = behaviour
        self.events: list[str] = []
        self.cancelled = trio.Event()

    async def run(self) -> None:
        while await self.sock.recv(1024):
            pass
        self.events.append("eof")
        if self.behaviour == "busy":
            await self.cancelled.wait()
        elif self.behaviour == "stuck":
            await trio.sleep_forever()
        self.sock.close()

    async def send_cancel(self) -> None:
        self.events.append("cancel")
        self.cancelled.set()

    async def terminate(self, wait: float) -> bool:
        self.events.append(f"terminate({wait:g})")
        return True


async def _run(behaviour: str) -> tuple[str, list[str]]:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = FakeBackend(theirs, behaviour)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.run)
        # Unread output the backend was sending: drained while waiting for its end.
        await theirs.send(b"D" * 4096)
        ended = await stop_backend(
            ours,
            closed_by_backend=False,
            send_cancel=backend.send_cancel,
            terminate=backend.terminate,
            bound=2.0,
        )
        nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()
    return ended.how, backend.events


async def test_idle_backend_ends_on_terminate(autojump_clock: trio.testing.MockClock) -> None:
    assert await _run("idle") == ("terminate", ["eof"])


async def test_busy_backend_gets_a_cancel(autojump_clock: trio.testing.MockClock) -> None:
    assert await _run("busy") == ("cancel", ["eof", "cancel"])


async def test_stop_backend_escalates_to_pg_terminate_backend(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert await _run("stuck") == ("pg_terminate_backend", ["eof", "cancel", "terminate(2)"])


@pytest.mark.parametrize(
    ("answer", "detail"),
    [(False, "still in pg_stat_activity after 2s"), (RuntimeError("admin down"), "admin down")],
)
async def test_unconfirmed_when_the_admin_cannot_confirm(
    autojump_clock: trio.testing.MockClock, answer: bool | Exception, detail: str
) -> None:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def terminate(wait: float) -> bool:
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def cancel() -> None:
        pass

    with ours, theirs:
        ended = await stop_backend(
            ours, closed_by_backend=False, send_cancel=cancel, terminate=terminate, bound=2.0
        )
    assert ended.how == "unconfirmed"
    assert ended.detail is not None and detail in ended.detail


async def test_a_backend_that_closed_first_needs_nothing() -> None:
    async def fail(*_: object) -> bool:
        raise AssertionError("nothing to do for a backend that closed")

    ended = await stop_backend(
        None, closed_by_backend=True, send_cancel=fail, terminate=fail, bound=2.0
    )
    assert ended.how == "backend_closed"


async def test_without_a_socket_the_admin_ends_it(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []

    async def terminate(wait: float) -> bool:
        calls.append(wait)
        return True

    ended = await stop_backend(
        None, closed_by_backend=False, send_cancel=None, terminate=terminate, bound=3.0
    )
    assert (ended.how, calls) == ("pg_terminate_backend", [3.0])
