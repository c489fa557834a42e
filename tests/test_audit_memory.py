"""What the statement audit keeps per session is bounded, whatever the client sends: a
client preparing millions of distinct statements, or binding millions of portals, cannot
grow Waypoint's memory (both trackers: the C one sessions run and the Python reference).
And nothing runs unrecorded on the way: an Execute of a statement whose text was evicted
is recorded with the text's SHA-256 and length (its ``parse`` record has the text)."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from waypoint.audit.names import ENTRY_COST
from waypoint.audit.session import session_tracker
from waypoint.audit.tracker import MAX_AWAITING, AuditTracker, with_context

CONTEXT = {"instance": "i1", "conn_id": "c-1", "login": "mallory@example.com", "node": "n1"}
BUDGET = 64 * 1024

Feed = Callable[[bytes], list[dict[str, Any]]]


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def parse(name: bytes, text: bytes) -> bytes:
    return msg(b"P", name + b"\0" + text + b"\0" + struct.pack("!h", 0))


def bind(portal: bytes, stmt: bytes, values: list[bytes]) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + struct.pack("!hh", 1, 0)
    body += struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", len(v)) + v
    return msg(b"B", body + struct.pack("!h", 0))


def execute(portal: bytes = b"") -> bytes:
    return msg(b"E", portal + b"\0" + struct.pack("!i", 0))


def close(what: bytes, name: bytes) -> bytes:
    return msg(b"C", what + name + b"\0")


def answers(data: bytes) -> bytes:
    """What a server answers to the complete messages of ``data`` when all goes well (a
    name changes when the server confirms it: ParseComplete, BindComplete, CloseComplete)."""
    out, pos = b"", 0
    while pos < len(data):
        kind = data[pos : pos + 1]
        (length,) = struct.unpack("!i", data[pos + 1 : pos + 5])
        pos += 1 + length
        if kind in (b"P", b"B", b"C"):
            out += msg({b"P": b"1", b"B": b"2", b"C": b"3"}[kind])
        elif kind == b"E":
            out += msg(b"C", b"SELECT 1\0")
        elif kind == b"S":
            out += msg(b"Z", b"I")
    return out


class Both:
    """The C and the reference tracker fed the same bytes: the same records, the same
    retained bytes."""

    def __init__(self, budget: int = BUDGET, parameters: str = "full") -> None:
        self.py = AuditTracker(CONTEXT, parameters=parameters,  # type: ignore[arg-type]
                               max_session_statement_bytes=budget)  # fmt: skip
        self.c = session_tracker(CONTEXT, parameters=parameters,  # type: ignore[arg-type]
                                 max_session_statement_bytes=budget, wall_clock=False)  # fmt: skip

    def client(self, data: bytes, answer: bool = True) -> list[dict[str, Any]]:
        """Feed ``data``; then, with ``answer``, the server's answers to it (their records
        compared, not returned)."""
        got = self.feed(True, data)
        if answer:
            self.feed(False, answers(data))
        return got

    def feed(self, client: bool, data: bytes) -> list[dict[str, Any]]:
        """Client (or, not ``client``, server) bytes to both: the records, the same."""
        want = [with_context(r) for r in (self.py.client if client else self.py.backend)(data, 1.0)]
        (self.c.client if client else self.c.backend)(data, 1.0)
        lines, _ = self.c.take()
        got = [json.loads(b"{" + line + b"}") for line in lines.splitlines()]
        assert got == want
        assert self.c.retained_bytes == self.py.retained_bytes
        assert self.c.awaiting == self.py.awaiting
        return got

    @property
    def retained(self) -> int:
        return int(self.c.retained_bytes)


def test_millions_of_prepared_statements_do_not_grow_memory() -> None:
    """The attack: Parse after Parse of distinct names, never closed (here 40,000 of 300
    bytes: 12 MB of texts). Each tracker's retained bytes stay within the budget, and the
    C tracker's real allocations too (traced: it allocates with PyMem_RawMalloc)."""
    text = b"select " + b"x" * 293
    for make in ("c", "py"):
        tracker: Any = (
            session_tracker(CONTEXT, max_session_statement_bytes=BUDGET, wall_clock=False)
            if make == "c"
            else AuditTracker(CONTEXT, max_session_statement_bytes=BUDGET)
        )
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(0, 40_000, 100):
                batch = b"".join(parse(b"s%d" % j, text) for j in range(i, i + 100))
                tracker.client(batch, 1.0)
                tracker.backend(msg(b"1") * 100, 1.0)  # the server confirms them
                if make == "c":
                    tracker.take()
                assert tracker.retained_bytes <= BUDGET
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert tracker.retained_bytes > BUDGET // 2  # the budget is used, not wasted
        if make == "c":
            # Table slots and allocator overhead beside the counted bytes: a small factor,
            # where keeping everything would be 12 MB.
            assert grown < 4 * BUDGET, grown


def test_reparsing_names_with_small_texts_frees_the_large_ones() -> None:
    """A name parsed with a large text, then again with a tiny one (an entry reused): the
    C tracker must not keep the large buffer the budget no longer counts."""
    tracker = session_tracker(CONTEXT, max_session_statement_bytes=BUDGET, wall_clock=False)
    big = b"select '" + b"z" * 30_000 + b"'"
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        grown = 0
        for i in range(1000):
            tracker.client(parse(b"s%d" % i, big), 1.0)
            tracker.backend(msg(b"1"), 1.0)
            tracker.client(close(b"S", b"s%d" % i) + parse(b"s%d" % i, b"select 1"), 1.0)
            tracker.backend(msg(b"3") + msg(b"1"), 1.0)
            tracker.take()
            grown = max(grown, tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    assert tracker.retained_bytes <= BUDGET
    assert grown < 4 * BUDGET, grown


def test_a_bind_of_many_large_parameters_keeps_them_within_the_cap() -> None:
    """One Bind of 600 parameters of 16 KB each (``parameters = "full"``): each alone is
    under max_statement_bytes, together they are 10 MB. What the message's parameters keep,
    together, is max_statement_bytes; the rest are recorded cut, with the SHA-256 of each."""
    both = Both()
    both.client(parse(b"s", b"select 1"))
    values = [bytes([65 + i % 26]) * 16_000 for i in range(600)]
    stream = bind(b"", b"s", values) + execute()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        both.c.client(stream, 1.0)
        grown = tracemalloc.get_traced_memory()[1] - base
        lines, _ = both.c.take()
    finally:
        tracemalloc.stop()
    got = [json.loads(b"{" + line + b"}") for line in lines.splitlines()]
    assert got == [with_context(r) for r in both.py.client(stream, 1.0)]
    params = got[0]["parameters"]
    assert len(params) == 600 and sum(len(p["text"]) for p in params) == 65536
    assert params[0] == {"text": values[0].decode()}
    for p, v in zip(params[5:], values[5:], strict=True):
        assert p["truncated"] is True and p["bytes"] == 16_000
        assert p["sha256"] == hashlib.sha256(v).hexdigest()
    assert grown < 2 << 20, grown


def test_millions_of_portals_do_not_grow_memory() -> None:
    """Bind after Bind of distinct portals with large parameters, never closed."""
    both = Both()
    both.client(parse(b"s", b"select $1"))
    value = b"v" * 2000
    for i in range(0, 3000, 50):
        both.client(b"".join(bind(b"p%d" % j, b"s", [value]) for j in range(i, i + 50)))
        assert both.retained <= 2 * BUDGET
    assert both.py.portals.retained <= BUDGET and both.py.portals.dropped > 0


def test_an_evicted_statement_runs_recorded_with_its_hash() -> None:
    """Past the budget the oldest text is replaced by its SHA-256 and length: a later
    Execute of it carries them (the parse record has the text with that hash)."""
    both = Both(budget=ENTRY_COST * 5 + 100)
    old = b"select 'the oldest statement'"
    both.client(parse(b"old", old))
    for i in range(3):
        both.client(parse(b"n%d" % i, b"select %d" % i + b" " * 40))
    assert both.py.statements.get("old").kept is None  # evicted
    records = both.client(bind(b"", b"old", [b"1"]) + execute())
    (rec,) = records
    assert rec["event"] == "execute" and rec["statement"] == "old"
    assert rec["text"] is None and rec["text_evicted"] is True
    assert rec["text_bytes"] == len(old)
    assert rec["text_sha256"] == hashlib.sha256(old).hexdigest()
    assert rec["parameters"] == [{"text": "1"}]
    # The newest are still whole.
    (rec,) = both.client(bind(b"", b"n2", []) + execute())
    assert rec["text"] == "select 2" + " " * 40 and "text_evicted" not in rec
    assert both.c.last_statement == rec["text"]


def test_a_cut_statement_evicted_keeps_the_hash_of_the_whole() -> None:
    big = b"select " + b"y" * 5000
    py = AuditTracker(CONTEXT, max_statement_bytes=100, max_session_statement_bytes=800)
    c = session_tracker(CONTEXT, max_statement_bytes=100, max_session_statement_bytes=800,
                        wall_clock=False)  # fmt: skip
    want: list[dict[str, Any]] = []
    for stream in (parse(b"big", big), parse(b"a", b"select 1"), parse(b"b", b"select 2")):
        want += [with_context(r) for r in py.client(stream, 1.0)]
        c.client(stream, 1.0)
        py.backend(answers(stream), 1.0)  # the server confirms it
        c.backend(answers(stream), 1.0)
    stream = bind(b"", b"big", []) + execute()
    want += [with_context(r) for r in py.client(stream, 1.0)]
    c.client(stream, 1.0)
    got = [json.loads(b"{" + line + b"}") for line in c.take()[0].splitlines()]
    assert got == want
    assert got[-1]["text_evicted"] is True and got[-1]["text_bytes"] == len(big)
    assert got[-1]["text_sha256"] == hashlib.sha256(big).hexdigest() == got[0]["text_sha256"]


def test_forgotten_statements_and_portals_are_marked_not_misattributed() -> None:
    """When even the evicted entries do not fit, the oldest are forgotten: an Execute of
    one is recorded with its name and ``text_evicted`` (no text); an Execute of a forgotten
    portal with ``portal_evicted`` (never as the unnamed statement)."""
    both = Both(budget=ENTRY_COST * 2 + 50)
    both.client(parse(b"", b"select 'unnamed'"))
    for i in range(5):
        both.client(parse(b"s%d" % i, b"select %d" % i))
    assert both.py.statements.dropped > 0
    (rec,) = both.client(bind(b"", b"s0", []) + execute())
    assert rec["statement"] == "s0" and rec["text"] is None and rec["text_evicted"] is True
    assert "text_sha256" not in rec
    for i in range(5):
        both.client(bind(b"p%d" % i, b"s4", [b"x" * 30]))
    assert both.py.portals.dropped > 0
    (rec,) = both.client(execute(b"p0"))
    assert rec["statement"] is None and rec["portal_evicted"] is True and rec["text"] is None
    (rec,) = both.client(execute(b"p4"))  # the newest portal: still known
    assert rec["statement"] == "s4" and "portal_evicted" not in rec


def test_an_evicted_portal_has_its_parameters_recorded_when_evicted() -> None:
    """A named portal's parameters dropped past the budget are recorded then (a ``bind``
    record); an Execute of the portal refers to it. The unnamed portal, once the server
    confirmed it, is never evicted."""
    both = Both(budget=1100)
    both.client(parse(b"s", b"select $1"))
    both.client(bind(b"", b"s", [b"u" * 400]))
    assert both.client(bind(b"p0", b"s", [b"a" * 100])) == []
    assert both.client(bind(b"p1", b"s", [b"b" * 100])) == []
    (bound,) = both.client(bind(b"p2", b"s", [b"c" * 100]))
    assert bound["event"] == "bind" and bound["portal"] == "p0" and bound["statement"] == "s"
    assert bound["parameters"] == [{"text": "a" * 100}]
    (rec,) = both.client(execute(b"p0"))
    assert rec["statement"] == "s" and rec["text"] == "select $1"
    assert rec["parameters_evicted"] is True and "parameters" not in rec
    assert rec["bind_id"] == bound["statement_id"]
    (rec,) = both.client(execute())
    assert rec["parameters"] == [{"text": "u" * 400}]


@pytest.mark.parametrize("what", [b"S", b"P"])
def test_close_frees_entries(what: bytes) -> None:
    both = Both()
    both.client(parse(b"s", b"select $1"))
    empty = both.retained
    for i in range(100):
        name = b"n%d" % i
        both.client(parse(name, b"select 1") if what == b"S" else bind(name, b"s", [b"1"]))
    assert both.retained > empty
    for i in range(100):
        both.client(close(what, b"n%d" % i))
    assert both.retained == empty


def test_a_pipeline_the_server_skips_keeps_nothing_waiting() -> None:
    """After an error in an extended-protocol pipeline the server discards everything up to
    Sync and answers nothing: a client streaming statements there without ever sending
    Sync piled up entries waiting for answers that never come. Each is recorded, and
    recorded as not run at once (the server skips it), and nothing is kept waiting."""
    both = Both()
    both.client(parse(b"bad", b"select 1/0") + bind(b"", b"bad", []) + execute(), answer=False)
    error = msg(b"E", b"SERROR\0C22012\0Mdivision by zero\0\0")
    want = [with_context(r) for r in both.py.backend(error, 2.0)]
    both.c.backend(error, 2.0)
    assert [json.loads(b"{" + x + b"}") for x in both.c.take()[0].splitlines()] == want
    assert want[0]["status"] == "error" and both.py.awaiting == both.c.awaiting == 0
    wave = (bind(b"", b"bad", []) + execute()) * 50 + msg(b"Q", b"select 2\0")
    for _ in range(200):
        records = both.client(wave, answer=False)
        assert len(records) == 102  # 51 statements, each with its not_run result
        assert {r["status"] for r in records if r["event"] == "result"} == {"not_run"}
        assert both.py.awaiting == both.c.awaiting == 0
    # Sync ends the skipping: the next statement waits for its answer again.
    both.client(msg(b"S") + bind(b"", b"bad", []) + execute(), answer=False)
    assert both.py.awaiting == both.c.awaiting == 3  # Sync, Bind, Execute


def test_a_pipeline_never_read_is_bounded_and_ends_with_an_audit_limit_record() -> None:
    """The attack: a client pipelining tiny statements (Bind, Execute, Sync: 31 bytes)
    without reading an answer, each waiting to be paired with its result. Both trackers
    keep at most MAX_AWAITING waiting (in the C tracker fixed-size entries, their memory
    within MAX_AWAITING of them); the one past it is recorded, then an ``audit_limit``
    record, and nothing more is taken, from either side (the session must end)."""
    both = Both()
    both.client(parse(b"s", b"select 1"))
    step = bind(b"", b"s", []) + execute() + msg(b"S")
    wave = step * 1000
    sent = 0
    records: list[dict[str, Any]] = []
    while not both.c.limited:
        assert sent <= MAX_AWAITING  # each step awaits two answers: the limit comes first
        records = both.client(wave, answer=False)
        sent += 1000
        assert both.py.awaiting == both.c.awaiting <= MAX_AWAITING
        assert both.c.awaiting_bytes <= MAX_AWAITING * 32
    assert both.py.limited and both.c.awaiting == MAX_AWAITING
    *_, last_execute, limit = records
    assert last_execute["event"] == "execute"
    assert limit == {**CONTEXT, "event": "audit_limit", "statement_id": limit["statement_id"],
                     "limit": "awaiting", "max_awaiting": MAX_AWAITING}  # fmt: skip
    assert limit["statement_id"] == last_execute["statement_id"] + 1
    # Whatever comes after is not taken (nor the server's answers).
    assert both.client(wave, answer=False) == []
    assert both.py.backend(msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"), 2.0) == []
    assert both.c.backend(msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"), 2.0) == 0
    assert both.py.awaiting == both.c.awaiting == MAX_AWAITING


@pytest.mark.parametrize("limit", [0, 1 << 25])
def test_the_awaiting_limit_is_checked(limit: int) -> None:
    with pytest.raises(ValueError, match="max_awaiting"):
        AuditTracker(CONTEXT, max_awaiting=limit)
    with pytest.raises(ValueError, match="max_awaiting"):
        session_tracker(CONTEXT, max_awaiting=limit)


def test_the_budget_is_configuration_checked() -> None:
    with pytest.raises(ValueError, match="max_session_statement_bytes"):
        AuditTracker(CONTEXT, max_session_statement_bytes=0)
    with pytest.raises(ValueError, match="max_session_statement_bytes"):
        session_tracker(CONTEXT, max_session_statement_bytes=0)
