"""The audit in both relay drivers: records queued before bytes are forwarded, a full
sink makes the session wait (bounded memory), a failing sink with ``on_error = "close"``
ends it with a FATAL. Real sockets, no PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import struct
import threading
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trustme
from tap_rig import TapRig

from waypoint.audit.session import SessionAudit, limit_fatal, session_tracker
from waypoint.audit.sink import AuditSink, OnError
from waypoint.proxy.relay import (
    RelayControl,
    RelayEngine,
    RelayResult,
    StreamRelay,
    _pump,
    open_relay_engine,
)
from waypoint.proxy.relay import client_tls as client_tls_module
from waypoint.proxy.relay import loop as loop_module
from waypoint.proxy.streams import ServerTLSStream

FATAL_TEXT = b"audit unavailable"


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def query(text: str) -> bytes:
    return msg(b"Q", text.encode() + b"\0")


FATAL = msg(b"E", b"SFATAL\0C58030\0M" + FATAL_TEXT + b"\0\0")


class GateWriter:
    """Blocks in ``write`` until opened; or fails while ``failing``."""

    def __init__(self, *, failing: bool = False) -> None:
        self.gate = threading.Event()
        self.failing = failing
        self.lines: list[bytes] = []
        self.entered = threading.Event()

    def last_line(self) -> bytes | None:
        return None

    def write(self, lines: list[bytes]) -> None:
        self.entered.set()
        if self.failing:
            raise OSError(5, "Input/output error")
        self.gate.wait(30)
        self.lines += [line for chunk in lines for line in chunk.splitlines(keepends=True)]

    def close(self) -> None:
        self.gate.set()

    def texts(self) -> list[str]:
        return [json.loads(x).get("text") for x in self.lines if json.loads(x)["event"] == "query"]


async def poll(cond: Callable[[], bool], what: str, bound: float = 10.0) -> None:
    with trio.fail_after(bound):
        while not cond():
            await trio.sleep(0.005)
    assert cond(), what


async def read_exactly(sock: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    with trio.fail_after(10):
        while len(data) < n:
            chunk = await sock.receive_some(n - len(data))
            assert chunk
            data += chunk
    return data


@asynccontextmanager
async def relayed(
    driver: str, audit: SessionAudit
) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream, RelayControl, RelayEngine | None]]:
    app_client, proxy_client = socket.socketpair()
    proxy_backend, app_backend = socket.socketpair()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(app_client))
    backend = trio.SocketStream(trio.socket.from_stdlib_socket(app_backend))
    async with trio.open_nursery() as nursery:
        if driver == "engine":
            async with open_relay_engine() as engine:
                handle = engine.start_relay(proxy_client, proxy_backend, audit=audit)
                yield client, backend, handle, engine
                handle.abort()
                with trio.fail_after(10):
                    await handle.wait()
        else:
            relay = StreamRelay(
                trio.SocketStream(trio.socket.from_stdlib_socket(proxy_client)),
                trio.SocketStream(trio.socket.from_stdlib_socket(proxy_backend)),
                audit=audit,
            )
            nursery.start_soon(relay.wait)
            yield client, backend, relay, None
            nursery.cancel_scope.cancel()
    for s in (proxy_client, proxy_backend):
        s.close()
    await client.aclose()
    await backend.aclose()


async def ended(control: RelayControl) -> RelayResult:
    """The verdict of the relay, once it ended."""
    if isinstance(control, StreamRelay):  # it runs in the fixture's task
        await poll(lambda: control.result is not None, "the relay ended")
        result = control.result
        assert result is not None
        return result
    with trio.fail_after(10):
        return await control.wait()


def make_audit(
    writer: GateWriter, on_error: OnError, max_queue: int, counts: dict[str, Any]
) -> SessionAudit:
    sink = AuditSink(writer, on_error=on_error, max_queue=max_queue, retry_interval=0.01)
    sink.start()
    counts["sink"] = sink
    counts["blocked"] = 0.0
    counts["closed"] = 0

    def blocked(seconds: float) -> None:
        counts["blocked"] += seconds

    def closed() -> None:
        counts["closed"] += 1

    tracker = session_tracker({"login": "alice@example.com"})
    return SessionAudit(tracker, sink, FATAL, on_blocked=blocked, on_closed=closed)


@pytest.mark.parametrize("driver", ["engine", "streams"])
async def test_a_full_sink_makes_the_session_wait_and_nothing_runs_unrecorded(driver: str) -> None:
    writer = GateWriter()
    counts: dict[str, Any] = {}
    audit = make_audit(writer, "block", 2, counts)
    sink: AuditSink = counts["sink"]
    async with relayed(driver, audit) as (client, backend, _control, _engine):
        q1, q2, q3 = query("select 1"), query("select 2"), query("select 3")
        await client.send_all(q1)
        assert await read_exactly(backend, len(q1)) == q1
        await client.send_all(q2)
        assert await read_exactly(backend, len(q2)) == q2
        await poll(lambda: sink.full, "the queue fills while the writer is stuck")
        await client.send_all(q3)
        # The session waits: the third query is not read while the queue is full.
        await poll(lambda: audit.must_wait, "still full")
        with trio.move_on_after(0.3):
            extra = await backend.receive_some(1024)
            pytest.fail(f"forwarded while the audit queue was full: {extra!r}")
        writer.gate.set()
        assert await read_exactly(backend, len(q3)) == q3
        await poll(lambda: len(writer.texts()) == 3, "every record written")
        assert writer.texts() == ["select 1", "select 2", "select 3"]
        await poll(lambda: counts["blocked"] > 0, "blocked time counted")
    sink.stop()


@pytest.mark.parametrize("driver", ["engine", "streams"])
async def test_a_failing_sink_with_close_ends_the_session_with_a_fatal(driver: str) -> None:
    writer = GateWriter(failing=True)
    counts: dict[str, Any] = {}
    audit = make_audit(writer, "close", 100, counts)
    sink: AuditSink = counts["sink"]
    async with relayed(driver, audit) as (client, backend, control, _engine):
        if driver == "engine":
            relay: Any = getattr(control, "_relay")  # noqa: B009  # which loop serves it
            assert relay.pumped  # the C loop, its tap holding the sink's gate
        q1 = query("select 1")
        await client.send_all(q1)
        assert await read_exactly(backend, len(q1)) == q1
        await poll(lambda: sink.failed, "the writer failed")
        await client.send_all(query("select 2"))
        got = await read_exactly(client, len(FATAL))
        assert got == FATAL
        result = await ended(control)
        assert result.reason == "terminated" and result.fatal_sent
        assert audit.closed and counts["closed"] == 1
        # The statement that could not be recorded never reached the server.
        with trio.move_on_after(0.2):
            rest = await backend.receive_some(1024)
            assert rest == b""
    sink.stop()


@pytest.mark.parametrize("on_error", ["block", "close"])
@pytest.mark.parametrize("driver", ["engine", "streams"])
async def test_a_pipeline_never_read_ends_the_session_at_the_audit_limit(
    driver: str, on_error: OnError
) -> None:
    """The attack: a client sends statements and never reads the answers (here the
    server does not answer either). Past ``max_awaiting`` statements waiting to be paired
    with their results, the session ends with FATAL 53400; the read that went past it is
    never forwarded, and the audit has every statement recorded, then ``audit_limit``.
    (The engine with ``block``: the C loop's tap.)"""
    writer = GateWriter()
    writer.gate.set()
    sink = AuditSink(writer, on_error=on_error, max_queue=1000, retry_interval=0.01)
    sink.start()
    tracker = session_tracker({"login": "mallory@example.com"}, max_awaiting=8)
    audit = SessionAudit(tracker, sink, FATAL)
    texts = [f"select {i}" for i in range(15)]
    first = b"".join(query(t) for t in texts[:5])
    rest = b"".join(query(t) for t in texts[5:])
    async with relayed(driver, audit) as (client, backend, control, _engine):
        await client.send_all(first)
        assert await read_exactly(backend, len(first)) == first
        await poll(lambda: tracker.awaiting == 5, "five statements wait for answers")
        await client.send_all(rest)
        fatal = limit_fatal(tracker)
        assert b"C53400\0" in fatal and b"more than 8 statements waiting" in fatal
        assert await read_exactly(client, len(fatal)) == fatal
        result = await ended(control)
        assert result.reason == "terminated" and result.fatal_sent
        # At most the statements within the limit reached the server, never the read that
        # went past it (a read is forwarded whole or not at all).
        forwarded = b""
        with trio.move_on_after(0.3):
            while chunk := await backend.receive_some(1024):
                forwarded += chunk
        assert rest.startswith(forwarded)
        assert forwarded.count(b"Q") <= 3
    await poll(lambda: any(b"audit_limit" in line for line in writer.lines), "the limit recorded")
    records = [json.loads(line) for line in writer.lines]
    assert [r["text"] for r in records if r["event"] == "query"] == texts[:9]
    assert records[-1]["event"] == "audit_limit" and records[-1]["max_awaiting"] == 8
    assert not audit.closed  # not the sink's doing
    sink.stop()


@pytest.mark.parametrize("driver", ["engine", "streams"])
async def test_every_statement_is_recorded_in_order_big_and_small(driver: str) -> None:
    """Many small statements and one far larger than a read and than max_statement_bytes
    (the engine's C loop feeds them to the session's tracker through its tap)."""
    writer = GateWriter()
    writer.gate.set()
    counts: dict[str, Any] = {}
    audit = make_audit(writer, "block", 10_000, counts)
    sink: AuditSink = counts["sink"]
    big = "select '" + "x" * (600 * 1024) + "'"
    texts = [f"select {i}" for i in range(300)] + [big] + [f"select {i}" for i in range(300, 310)]
    async with relayed(driver, audit) as (client, backend, _control, _engine):
        payload = b"".join(query(t) for t in texts)

        async def send() -> None:
            await client.send_all(payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            assert await read_exactly(backend, len(payload)) == payload
        await poll(lambda: len(writer.texts()) == len(texts), "every record written")
    recorded = writer.texts()
    assert recorded[:300] == texts[:300] and recorded[301:] == texts[301:]
    (big_rec,) = [json.loads(x) for x in writer.lines if json.loads(x).get("text_truncated")]
    assert big_rec["text_bytes"] == len(big)
    assert big_rec["text_sha256"] == hashlib.sha256(big.encode()).hexdigest()
    sink.stop()


async def test_past_the_tap_bound_python_records_a_read_before_sending_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the tap at its bound (records not yet queued), the C loop sends nothing more:
    it hands the read to Python (TAP), which queues the records, records the read and only
    then sends it. Every statement is recorded, in order, and relayed."""
    calls: list[int] = []
    audit_read = loop_module.EpollLoop._audit

    def counting(self: Any, audit: SessionAudit, side: Any, data: bytes) -> bool:
        calls.append(len(data))
        return audit_read(self, audit, side, data)

    monkeypatch.setattr(loop_module, "_TAP_MAX", 1024)
    monkeypatch.setattr(loop_module.EpollLoop, "_audit", counting)
    writer = GateWriter()
    writer.gate.set()
    counts: dict[str, Any] = {}
    audit = make_audit(writer, "block", 100_000, counts)
    texts = [f"select {i} /* {'p' * (i % 50)} */" for i in range(3000)]
    async with relayed("engine", audit) as (client, backend, _control, _engine):
        for start in range(0, len(texts), 100):  # many reads, each past the bound
            payload = b"".join(query(t) for t in texts[start : start + 100])
            await client.send_all(payload)
            assert await read_exactly(backend, len(payload)) == payload
        await poll(lambda: len(writer.texts()) == len(texts), "every record written")
    assert writer.texts() == texts
    assert calls, "the tap never reached its bound: the TAP path did not run"
    counts["sink"].stop()


async def test_an_idle_audited_relay_leaves_the_engine_waiting_without_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay served in C with its audit tap: the engine's wait is bounded only once a
    read gave the tap records (they are queued within the audit poll), so an idle audited
    session wakes nothing, and what it sent is still recorded."""
    waits: list[tuple[float, float]] = []

    class RecordingPump:
        def __init__(self, *args: int) -> None:
            self._pump = _pump.Pump(*args)

        def add(self, lane: _pump.Lane) -> None:
            self._pump.add(lane)

        def discard(self, lane: _pump.Lane) -> None:
            self._pump.discard(lane)

        def __len__(self) -> int:
            return len(self._pump)

        def run(self, timeout: float, tap_wait: float = -1.0) -> list[Any]:
            waits.append((timeout, tap_wait))
            return self._pump.run(timeout, tap_wait)

    shim = types.SimpleNamespace(**{k: getattr(_pump, k) for k in dir(_pump) if not k.startswith("__")})
    shim.Pump = RecordingPump
    monkeypatch.setattr(loop_module, "_pump", shim)
    writer = GateWriter()
    writer.gate.set()
    counts: dict[str, Any] = {}
    audit = make_audit(writer, "block", 1000, counts)
    unbounded = (-1.0, loop_module._AUDIT_POLL)
    async with relayed("engine", audit) as (client, backend, _control, _engine):
        q = query("select 1")
        await client.send_all(q)
        assert await read_exactly(backend, len(q)) == q
        await poll(lambda: writer.texts() == ["select 1"], "the statement recorded")
        await poll(lambda: waits[-1] == unbounded, "the engine waiting without a bound")
        reply = msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")
        await backend.send_all(reply)
        assert await read_exactly(client, len(reply)) == reply
        await poll(lambda: len(writer.lines) == 2, "the result recorded")
        await poll(lambda: waits[-1] == unbounded, "waiting without a bound again")
    counts["sink"].stop()


def test_a_client_read_is_handed_to_python_unsent_while_the_sink_refuses() -> None:
    """``on_error = "close"`` on the C loop: while the sink's gate is set (the sink failing
    or full) a client read goes to Python (TAP) neither recorded nor sent, so that the
    session ends before it reaches the server; the backend's reads still pass in C; once
    the gate is clear the C loop records and sends client reads again."""
    tracker = session_tracker({"login": "alice@example.com"})
    gate = bytearray(1)
    tracker.refuse_with(gate)
    with TapRig(_pump, tracker) as rig:
        q1, q2 = query("select 1"), query("select 2")
        rig.client_app.sendall(q1)
        assert rig.pump.run(1.0) == []  # gate clear: recorded and sent in C
        assert rig.backend_app.recv(100) == q1
        gate[0] = 1
        rig.client_app.sendall(q2)
        [(code, fd, _, n, chunk)] = rig.pump.run(1.0)
        assert (code, fd, n, chunk) == (_pump.TAP, rig.client.fd, len(q2), q2)
        assert rig.backend_got_nothing()  # not sent
        lines, count = tracker.take()
        assert count == 1 and b"select 1" in lines  # nor recorded: Python records it
        reply = msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")
        rig.backend_app.sendall(reply)
        assert rig.pump.run(1.0) == []  # the backend's read passes in C, recorded
        assert rig.client_app.recv(100) == reply
        assert tracker.take()[1] == 1  # the result of select 1
        gate[0] = 0
        rig.client_app.sendall(q2)
        assert rig.pump.run(1.0) == []
        assert rig.backend_app.recv(100) == q2
        with pytest.raises(ValueError, match="gate"):
            tracker.refuse_with(b"x")  # read-only
        with pytest.raises(BufferError):
            gate.append(0)  # held by the tracker: the C loop's pointer stays valid


def test_the_c_loop_comes_back_for_the_records_it_gave_a_tap() -> None:
    """With ``tap_wait``, Pump.run returns that long after it first fed records to an audit
    tap, also without a timeout: an idle audited relay wakes nothing, and what it records
    is queued within ``tap_wait`` of the read."""
    with TapRig(_pump, session_tracker({})) as rig:
        q = query("select 1")
        rig.client_app.sendall(q)
        result: list[object] = []
        runner = threading.Thread(target=lambda: result.append(rig.pump.run(-1.0, 0.0)), daemon=True)
        runner.start()
        runner.join(10)
        if runner.is_alive():  # let it go (EOF is a report) before failing
            rig.client_app.shutdown(socket.SHUT_WR)
            runner.join(10)
            pytest.fail("run() without a timeout did not come back for the tap's records")
        assert result == [[]]  # relayed in C, nothing for Python but the records
        assert rig.backend_app.recv(100) == q
        assert rig.client.tap_used > 0


def test_the_tap_is_bounded_and_emptied() -> None:
    a, b = socket.socketpair()
    try:
        lane = _pump.Lane(a.fileno())
        tracker = session_tracker({"login": "alice@example.com"})
        with pytest.raises(ValueError):
            lane.tap_enable(tracker, 10)
        with pytest.raises(TypeError):
            lane.tap_enable(object(), 4096)  # type: ignore[arg-type]
        lane.tap_enable(tracker, 4096)
        assert lane.tap_used == 0
        tracker.client(b"Q\0\0\0\x0dSELECT 1\0", 1.0)
        assert lane.tap_used > 0
        lines, count = tracker.take()
        assert count == 1 and lines.endswith(b"\n") and lane.tap_used == 0
    finally:
        a.close()
        b.close()


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.mark.parametrize("mode", ["block", "close", None])
async def test_a_tls_client_is_recorded_in_plaintext(mode: OnError | None) -> None:
    """An audited relay with a TLS client: its record layer stays in C and the C loop's tap
    records the decrypted plaintext (``block`` and ``close`` alike: with ``close`` a client
    read while the sink refuses records goes to Python unsent). Every statement is
    recorded, in order, before it reaches the server. Without audit: in C too."""
    audited = mode is not None
    in_c = True
    if not client_tls_module.c_tls_available():
        pytest.fail("OpenSSL could not be bound: the C record layer is not testable here")
    writer = GateWriter()
    writer.gate.set()
    counts: dict[str, Any] = {}
    audit = make_audit(writer, mode, 10_000, counts) if mode is not None else None
    app_client, proxy_client = socket.socketpair()
    proxy_backend, app_backend = socket.socketpair()
    server_ctx, client_ctx = _tls_contexts()
    for s in (app_client, proxy_client):
        s.setblocking(False)
    app = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(app_client)),
        client_ctx,
        server_hostname="relay.test",
        https_compatible=True,
    )
    proxy = ServerTLSStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(proxy_client)), server_ctx
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(app.do_handshake)
            n.start_soon(proxy.do_handshake)
    handover = proxy.handover()
    raw = proxy.transport_stream
    assert isinstance(raw, trio.SocketStream)
    tls_sock = socket.socket(fileno=raw.socket.detach())
    backend = trio.SocketStream(trio.socket.from_stdlib_socket(app_backend))
    texts = [f"select {i}" for i in range(200)] + ["select '" + "y" * 300_000 + "'"]
    payload = b"".join(query(t) for t in texts)
    async with open_relay_engine(c_tls=True) as engine:
        handle = engine.start_relay(tls_sock, proxy_backend, client_tls=handover, audit=audit)
        relay: Any = handle._relay  # which record layer serves it
        assert relay.client.tls is not None
        assert relay.client.tls.in_c is in_c
        assert relay.client.tls_in_c is in_c
        assert relay.pumped is in_c
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(app.send_all, payload)
                assert await read_exactly(backend, len(payload)) == payload
            reply = msg(b"Z", b"I")
            await backend.send_all(reply)
            assert await read_exactly(app, len(reply)) == reply
        if audited:
            await poll(lambda: len(writer.texts()) == len(texts), "every record written")
            assert writer.texts()[:-1] == texts[:-1]
            (big,) = [json.loads(x) for x in writer.lines if json.loads(x).get("text_truncated")]
            assert big["text_sha256"] == hashlib.sha256(texts[-1].encode()).hexdigest()
        handle.abort()
        with trio.fail_after(10):
            await handle.wait()
    if audit is not None:
        counts["sink"].stop()
    for s in (tls_sock, proxy_backend):
        s.close()
    await backend.aclose()
