"""Pre-authentication bounds without PostgreSQL: the per-address cancel token buckets, the
handshake gate, burst logging, the accept back-off on EMFILE (MockClock), the open-file limit
raised at start, and where Waypoint's own cancels may go."""

from __future__ import annotations

import errno
import resource
from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

import pytest
import trio
import trio.testing
from cancel_support import forwarded, listening_socket
from e2e_support import LogRecords, capture_logs

from waypoint.app import raise_nofile_limit
from waypoint.config.model import AdmissionConfig
from waypoint.observability.log import get_logger
from waypoint.observability.metrics import Metrics
from waypoint.pgwire import CancelRequest, build_cancel_request
from waypoint.proxy.admission import (
    AcceptBackoff,
    Admission,
    BurstLog,
    HandshakeGate,
    TokenBuckets,
)
from waypoint.proxy.context import ListenerContext
from waypoint.proxy.listener import accept_forever, accept_loop
from waypoint.state import CancelTarget, MemoryStateStore


@pytest.fixture
def records() -> Iterator[LogRecords]:
    with capture_logs() as handler:
        yield handler


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_per_address_then_one_per_interval() -> None:
    clock = _Clock()
    buckets = TokenBuckets(3, 0.5, clock=clock)
    assert [buckets.take("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("10.0.0.2")  # another address has its own bucket
    clock.now = 0.49
    assert not buckets.take("10.0.0.1")
    clock.now = 0.5
    assert buckets.take("10.0.0.1")
    assert not buckets.take("10.0.0.1")
    clock.now = 100.0  # refills to the burst, never beyond
    assert [buckets.take("10.0.0.1") for _ in range(4)] == [True, True, True, False]


def test_token_bucket_table_is_bounded_and_churning_addresses_share_one_bucket() -> None:
    clock = _Clock()
    buckets = TokenBuckets(2, 10.0, max_keys=100, clock=clock)
    for i in range(100):
        assert buckets.take(f"10.0.{i // 256}.{i % 256}")
    # The table is full of buckets still in use: new addresses share the overflow bucket.
    fresh = [buckets.take(f"10.1.0.{i}") for i in range(50)]
    assert fresh == [True, True] + [False] * 48
    assert len(buckets) == 100
    # Once the tracked buckets have refilled they are forgotten to make room.
    clock.now = 1000.0
    assert buckets.take("10.2.0.1")
    assert len(buckets) <= 100


def test_handshake_gate_counts_per_address_and_tickets_release_once() -> None:
    gate = HandshakeGate(2)
    a1, a2 = gate.enter("10.0.0.1"), gate.enter("10.0.0.1")
    assert a1 is not None and a2 is not None
    assert gate.enter("10.0.0.1") is None
    b = gate.enter("10.0.0.2")
    assert b is not None
    a1.release()
    a1.release()  # idempotent
    assert gate.pending("10.0.0.1") == 1
    assert gate.enter("10.0.0.1") is not None
    for t in (a2, b):
        t.release()
    assert gate.pending("10.0.0.2") == 0
    assert len(gate) == 1  # only the address still holding a ticket


async def test_burst_log_writes_the_first_event_and_one_summary_per_window(
    autojump_clock: trio.testing.MockClock, records: LogRecords
) -> None:
    burst = BurstLog(get_logger("test"), "probe_refused", window=10.0, sample=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(burst.run)
        for i in range(3000):
            burst.record("unknown_key" if i % 3 else "rate_limited", f"192.0.2.{i % 7}")
        await trio.sleep(10.5)
        lines = records.events("probe_refused")
        assert len(lines) == 2, lines
        assert lines[0]["count"] == 1 and lines[0]["reason"] == "rate_limited"
        summary = lines[1]
        assert summary["reason"] == "summary" and summary["count"] == 2999
        assert summary["by_reason"] == "rate_limited=999,unknown_key=2000"
        assert summary["sources"].endswith(",...")
        # Quiet for a window: the next event is logged at once again.
        await trio.sleep(30)
        burst.record("unknown_key", "192.0.2.1")
        assert len(records.events("probe_refused")) == 3
        nursery.cancel_scope.cancel()


class _FailingListener(trio.abc.Listener[trio.SocketStream]):
    """accept() raises EMFILE ``failures`` times, then blocks forever."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    async def accept(self) -> trio.SocketStream:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_emfile_in_accept_backs_off_boundedly_is_counted_and_logged_once(
    autojump_clock: trio.testing.MockClock, records: LogRecords
) -> None:
    listener = _FailingListener(200)
    errors: list[int | None] = []

    async def admit(stream: trio.SocketStream) -> None:
        raise AssertionError("nothing is accepted")

    with trio.move_on_after(600):
        await accept_forever(
            listener,
            admit,
            on_error=lambda exc: errors.append(exc.errno),
            listener_name="pg-main",
            backoff=AcceptBackoff(0.01, 1.0),
        )
    assert errors == [errno.EMFILE] * 200
    gaps = [b - a for a, b in zip(listener.calls, listener.calls[1:], strict=False)]
    # Doubling from 10 ms, never more than the 1 s bound.
    assert gaps[:4] == pytest.approx([0.01, 0.02, 0.04, 0.08])
    assert max(gaps) == pytest.approx(1.0)
    assert all(g <= 1.0 + 1e-9 for g in gaps)
    assert len(records.events("accept_failed")) == 1


def test_accept_backoff_starts_over_after_a_success() -> None:
    backoff = AcceptBackoff(0.01, 0.05)
    assert [backoff.failed() for _ in range(5)] == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])
    assert backoff.succeeded() == 5
    assert backoff.failed() == pytest.approx(0.01)


def test_nofile_limit_is_raised_to_the_hard_limit() -> None:
    calls: list[tuple[int, tuple[int, int]]] = []
    got = raise_nofile_limit(
        getrlimit=lambda _: (1024, 524288),
        setrlimit=lambda which, limits: calls.append((which, limits)),
    )
    assert got == 524288
    assert calls == [(resource.RLIMIT_NOFILE, (524288, 524288))]

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    assert raise_nofile_limit(getrlimit=lambda _: (1024, 4096), setrlimit=refuse) == 1024
    # And for real, in this process.
    raise_nofile_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard


async def test_waypoints_own_cancel_goes_only_to_the_configured_backend() -> None:
    """``forward_cancel`` (Waypoint cancelling its own session's statement) sends to the
    listener's configured backend and never to an address a cancel entry names otherwise."""
    async with listening_socket() as configured, listening_socket() as other:
        port, other_port = configured.getsockname()[1], other.getsockname()[1]
        store = MemoryStateStore()
        request = CancelRequest(7, b"\x01\x02\x03\x04")
        for target in (
            CancelTarget("pg-main", ("127.0.0.1", other_port), "ann@example.com"),
            CancelTarget("pg-other", ("127.0.0.1", port), "ann@example.com"),
        ):
            await store.register_cancel_key(request.pid, request.secret, target, ttl=60)
            assert await forwarded(store, request, configured) is None
        target = CancelTarget("pg-main", ("127.0.0.1", port), "ann@example.com")
        await store.register_cancel_key(request.pid, request.secret, target, ttl=60)
        sent = await forwarded(store, request, configured)
        assert sent == build_cancel_request(request.pid, request.secret)
        with trio.move_on_after(0.2):
            await other.accept()
            raise AssertionError("a cancel went to the address the entry named")


def test_cancel_targets_round_trip_and_bare_or_malformed_values_name_no_owner() -> None:
    target = CancelTarget("pg-main", ("::1", 5432), "tagged-devices/web1")
    assert CancelTarget.decode(target.encode()) == target
    assert CancelTarget.decode("10.0.0.5:5432") == CancelTarget("", ("10.0.0.5", 5432), "")
    for bad in ("", "{", "[]", '{"l": 1, "b": "h:1", "p": "x"}', '{"l": "a", "b": "h", "p": ""}'):
        assert CancelTarget.decode(bad) is None, bad


async def test_accept_loop_counts_emfile_in_the_metric_by_errno(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    # accept_loop reads only the listener's name, the metrics and the admission bounds.
    ctx = cast(
        ListenerContext,
        SimpleNamespace(
            listener=SimpleNamespace(name="pg-main"),
            metrics=metrics,
            admission=Admission(AdmissionConfig(), metrics),
        ),
    )
    listener = cast(trio.SocketListener, _FailingListener(3))
    async with trio.open_nursery() as sessions:
        with trio.move_on_after(60):
            await accept_loop(ctx, listener, sessions)
    value = metrics.registry.get_sample_value(
        "waypoint_accept_errors_total", {"listener": "pg-main", "errno": "EMFILE"}
    )
    assert value == 3.0
