"""The C tracker (waypoint/proxy/relay/_audit.h) when memory runs out: each of its
allocations made to fail in turn (a fault-injection build: WAYPOINT_AUDIT_FAULTS defined,
as .ci/sanitize builds it; otherwise this module builds one of its own), the tracker fails
cleanly: MemoryError from then on (the relay ends rather than forwarding), no crash, the
records of what came before intact, nothing leaked; and the C loop never sends a read
whose feed failed the tracker."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from tap_rig import TapRig

from waypoint.audit.tracker import SHORT_CONTEXT, AuditTracker, context_members, with_context
from waypoint.proxy.relay import _pump

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "waypoint" / "proxy" / "relay" / "_pump.c"
CONTEXT = {"instance": "i1", "conn_id": "c-1", "login": "alice@example.com", "node": "n1"}


def _build(into: Path) -> Path:
    """The extension compiled with WAYPOINT_AUDIT_FAULTS (flags as setup.py's)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    assert shutil.which(cc[0]), f"no C compiler ({cc[0]}) to build the fault-injection copy"
    out = into / f"_pump{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [*cc, "-shared", "-fPIC", "-O1", "-std=c11", "-DWAYPOINT_AUDIT_FAULTS",
         f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(out)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The extension with audit_faults(): the one loaded when it has it (the sanitizer
    build), else a copy built here and loaded beside it."""
    if hasattr(_pump, "audit_faults"):
        yield _pump
        return
    path = _build(tmp_path_factory.mktemp("faults"))
    spec = importlib.util.spec_from_file_location(_pump.__name__, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "audit_faults") and module.__file__ == str(path)
    yield module
    module.audit_faults(0)


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def bind(portal: bytes, stmt: bytes, values: list[bytes]) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + struct.pack("!h", len(values))
    body += b"".join(struct.pack("!h", i % 2) for i in range(len(values)))
    body += struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", len(v)) + v
    return msg(b"B", body + struct.pack("!h", 0))


def stream() -> list[tuple[bool, bytes]]:
    """Reads reaching every allocation: texts kept and cut, statement and portal tables
    grown past their first slots (and evicting), parameter formats, the ring of
    statements awaiting answers grown, the server's tags and errors, the record buffer."""
    big = b"select '" + b"x" * 5000 + b"'"
    parses = b"".join(msg(b"P", b"s%d\0" % i + big[: 100 + 40 * i] + b"\0\0\0") for i in range(40))
    binds = b"".join(bind(b"p%d" % i, b"s%d" % i, [b"v" * i, b"\xff" * 3]) for i in range(40))
    runs = b"".join(msg(b"E", b"p%d\0\0\0\0\0" % i) for i in range(40)) + msg(b"S")
    answers = (msg(b"C", b"SELECT 1\0") * 39 + msg(b"E", b"SERROR\0C22012\0Mboom\0\0")
               + msg(b"Z", b"I"))  # fmt: skip
    return [
        (True, msg(b"Q", big + b"\0")),
        (False, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")),
        (True, parses),
        (True, binds[:3000]),
        (True, binds[3000:]),
        (True, runs),
        (False, answers),
        (True, msg(b"F", struct.pack("!ihhhi", 42, 1, 1, 1, 3) + b"abc" + b"\0\0")),
        (True, msg(b"C", b"Ss3\0") + msg(b"Q", b"select 2\0")),
    ]


def tracker(module: ModuleType) -> object:
    return module.AuditTracker(
        context_members(CONTEXT).encode(),
        context_members({k: CONTEXT[k] for k in SHORT_CONTEXT if k in CONTEXT}).encode(),
        parameters="full",
        max_statement_bytes=1024,
        max_session_statement_bytes=8192,
        wall_clock=False,
    )


def reference() -> list[list[dict[str, object]]]:
    py = AuditTracker(CONTEXT, parameters="full", max_statement_bytes=1024,
                      max_session_statement_bytes=8192)  # fmt: skip
    out = []
    for i, (front, data) in enumerate(stream()):
        records = py.client(data, 1.0 + i) if front else py.backend(data, 1.0 + i)
        out.append([with_context(r) for r in records])
    return out


def parsed(lines: bytes) -> list[dict[str, object]]:
    return [json.loads(b"{" + line + b"}") for line in lines.splitlines()]


def test_the_stream_runs_whole_without_a_fault(faulty: ModuleType) -> None:
    """The fault build is the tracker the differential tests check: the same records."""
    faulty.audit_faults(0)
    t = tracker(faulty)
    got = []
    for i, (front, data) in enumerate(stream()):
        (t.client if front else t.backend)(data, 1.0 + i)  # type: ignore[attr-defined]
        got.append(parsed(t.take()[0]))  # type: ignore[attr-defined]
    want = reference()
    for mine, theirs in zip(got, want, strict=True):
        for rec in (*mine, *theirs):
            rec.pop("duration_ms", None)
        assert mine == theirs
    made, _ = faulty.audit_faults(0)
    assert made > 50  # enough allocations to fail one by one


def test_every_allocation_that_fails_fails_the_tracker_cleanly(faulty: ModuleType) -> None:
    """Each allocation of the stream made to fail in turn: the read during which it failed
    raises MemoryError and so does every later one (the relay ends, that read unsent);
    what the reads before it recorded is taken whole, as the reference has it; nothing the
    tracker allocated outlives it (the build counts the blocks alive)."""
    want = reference()
    events = stream()
    t = tracker(faulty)
    faulty.audit_faults(0)
    for i, (front, data) in enumerate(events):
        (t.client if front else t.backend)(data, 1.0 + i)  # type: ignore[attr-defined]
        t.take()  # type: ignore[attr-defined]
    total, _ = faulty.audit_faults(0)
    del t
    try:
        for n in range(1, total + 1):
            _, before = faulty.audit_faults(0)
            t = tracker(faulty)
            faulty.audit_faults(n)
            failed_at = None
            for i, (front, data) in enumerate(events):
                try:
                    (t.client if front else t.backend)(data, 1.0 + i)  # type: ignore[attr-defined]
                except MemoryError:
                    failed_at = i
                    break
                lines, _ = t.take()  # type: ignore[attr-defined]
                got = parsed(lines)
                for rec in (*got, *want[i]):
                    rec.pop("duration_ms", None)
                assert got == want[i], f"allocation {n}: read {i}"
            assert failed_at is not None, f"allocation {n} failed unnoticed"
            assert faulty.audit_faults(0)[0] >= n  # the n-th was made (and failed)
            assert t.take() == (b"", 0)  # type: ignore[attr-defined]  # that read's: dropped
            for later, (front, data) in enumerate(events[failed_at:], failed_at):
                with pytest.raises(MemoryError):
                    (t.client if front else t.backend)(data, 1.0 + later)  # type: ignore[attr-defined]
            del t
            assert faulty.audit_faults(0)[1] == before, f"allocation {n}: leaked"
    finally:
        faulty.audit_faults(0)


def test_the_chain_fails_cleanly(faulty: ModuleType) -> None:
    faulty.audit_faults(1)
    with pytest.raises(MemoryError):
        faulty.audit_chain("0" * 64, 0, b'"a":1\n"b":2\n')
    assert faulty.audit_faults(0)[0] == 1
    lines, _, seq = faulty.audit_chain("0" * 64, 0, b'"a":1\n')
    assert seq == 1 and lines.startswith(b'{"seq":1,')


def test_the_c_loop_never_sends_a_read_whose_feed_failed_the_tracker(faulty: ModuleType) -> None:
    """A relay served in C with an audit tap: the read during which the tracker ran out of
    memory goes back to Python unsent (TAP), and so does every read after it; what was
    recorded before is taken whole."""
    t = tracker(faulty)
    with TapRig(faulty, t) as rig:
        q1 = msg(b"Q", b"select 1\0")
        rig.client_app.sendall(q1)
        assert rig.pump.run(1.0) == []  # recorded and sent in C
        assert rig.backend_app.recv(100) == q1
        faulty.audit_faults(1)  # the next allocation: growing the next query's kept text
        q2 = msg(b"Q", b"select 2" + b" " * 4000 + b"\0")
        rig.client_app.sendall(q2)
        [(code, fd, _, n, chunk)] = rig.pump.run(1.0)
        assert (code, fd, n, chunk) == (faulty.TAP, rig.client.fd, len(q2), q2)
        assert faulty.audit_faults(0)[0] >= 1
        with pytest.raises(MemoryError):
            t.client(chunk, 2.0)  # type: ignore[attr-defined]  # what Python does: the relay ends
        lines, count = t.take()  # type: ignore[attr-defined]
        assert count == 1 and parsed(lines)[0]["text"] == "select 1"
        rig.client_app.sendall(msg(b"Q", b"select 3\0"))
        [(code, _, _, _, _)] = rig.pump.run(1.0)
        assert code == faulty.TAP
        assert rig.backend_got_nothing()  # neither read reached the server
