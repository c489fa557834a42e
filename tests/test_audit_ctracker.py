"""The C tracker (waypoint/proxy/relay/_audit.h) against the Python reference tracker
(waypoint/audit/tracker.py): the same byte streams, split anywhere and interleaved, must
give the same records; and the C hash chain against the sink's definition of a link."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.audit.messages import ParameterMode
from waypoint.audit.session import session_tracker
from waypoint.audit.sink import GENESIS, encode_body, line_hash
from waypoint.audit.tracker import AuditTracker, with_context
from waypoint.proxy.relay import _pump

CONTEXT = {"instance": "i1", "conn_id": "c-1", "login": "alice@example.com", "node": "n1",
           "database": "app", "role": "app", "tags": ["tag:x"], "client": "100.64.0.1"}  # fmt: skip


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def cut(message: bytes, keep: int) -> bytes:
    """``message`` with its body cut to ``keep`` bytes (the length says so: malformed)."""
    body = message[5 : 5 + keep]
    return message[:1] + struct.pack("!i", len(body) + 4) + body


# -- message strategies -------------------------------------------------------------------

names = st.sampled_from([b"", b"s1", b"s2", b"p\xc3\xa9", b"bad\xff"])
texts = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\0", b"")),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass").replace(b"\0", b"")),
    st.sampled_from([b"select 1", b"\xe0\x80\xff", b"\xf0\x90\x80", b'a"\\\n\t\x01\x7f']),
)
values = st.one_of(st.none(), st.binary(max_size=50), st.text(max_size=20).map(str.encode))


@st.composite
def params(draw: st.DrawFn) -> bytes:
    vals = draw(st.lists(values, max_size=4))
    nfmt = draw(st.sampled_from([0, 1, len(vals), max(0, len(vals) - 1)]))
    fmts = [draw(st.sampled_from([0, 1, 2])) for _ in range(nfmt)]
    body = struct.pack("!h", nfmt) + b"".join(struct.pack("!h", f) for f in fmts)
    body += struct.pack("!h", len(vals))
    for v in vals:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return body


@st.composite
def front_message(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from("QQPPBBEECCFSSdDHcX"))
    if kind == "Q":
        m = msg(b"Q", draw(texts) + b"\0" + draw(st.sampled_from([b"", b"junk\0"])))
    elif kind == "P":
        m = msg(b"P", draw(names) + b"\0" + draw(texts) + b"\0" + struct.pack("!h", 0))
    elif kind == "B":
        body = draw(names) + b"\0" + draw(names) + b"\0" + draw(params())
        m = msg(b"B", body + struct.pack("!h", 0))
    elif kind == "E":
        m = msg(b"E", draw(names) + b"\0" + struct.pack("!i", draw(st.integers(0, 5))))
    elif kind == "C":
        m = msg(b"C", draw(st.sampled_from([b"S", b"P", b"X"])) + draw(names) + b"\0")
    elif kind == "F":
        m = msg(b"F", struct.pack("!i", draw(st.integers(-5, 1 << 20))) + draw(params()))
    else:
        m = msg(kind.encode(), draw(st.binary(max_size=8)))
    if len(m) > 5 and draw(st.integers(0, 9)) == 0:
        m = cut(m, draw(st.integers(0, len(m) - 5)))  # malformed: the body ends early
    return m


@st.composite
def back_message(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from("CCCEEZZZIsGHWTDN1112223nT"))
    if kind == "C":
        tag = draw(st.sampled_from([b"SELECT 1", b"COPY 12", b"COPY 007", b"COPY x", b"COPY ",
                                    b"INSERT 0 3", b"COPY 1 2", b"\xffCOPY 3", b"PREPARE",
                                    b"DEALLOCATE", b"DEALLOCATE ALL", b"DECLARE CURSOR",
                                    b"CLOSE CURSOR", b"CLOSE CURSOR ALL"]))  # fmt: skip
        m = msg(b"C", tag + b"\0")
    elif kind == "E":
        fields = b""
        for code in draw(st.lists(st.sampled_from(b"SCMV"), max_size=4)):
            fields += bytes([code]) + draw(st.sampled_from([b"42601", b"ERROR", b"x\xff"])) + b"\0"
        m = msg(b"E", fields + b"\0")
    elif kind == "Z":
        m = msg(b"Z", b"I")
    elif kind in "GHW":
        m = msg(kind.encode(), b"\0\0\0")
    else:
        m = msg(kind.encode(), draw(st.binary(max_size=8)))
    if len(m) > 5 and draw(st.integers(0, 12)) == 0:
        m = cut(m, draw(st.integers(0, len(m) - 5)))
    return m


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` split at random places (single bytes, headers split, several messages)."""
    out, pos = [], 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 5, 7, 16, 64, len(data)])
        out.append(data[pos : pos + step])
        pos += step
    return out


# -- running both -------------------------------------------------------------------------


def run_both(
    events: list[tuple[bool, bytes]],
    mode: ParameterMode,
    cap: int,
    budget: int = 4 << 20,
    max_awaiting: int = 65536,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]]:
    py = AuditTracker(
        CONTEXT,
        parameters=mode,
        max_statement_bytes=cap,
        max_session_statement_bytes=budget,
        max_awaiting=max_awaiting,
    )
    c = session_tracker(
        CONTEXT,
        parameters=mode,
        max_statement_bytes=cap,
        max_session_statement_bytes=budget,
        wall_clock=False,
        max_awaiting=max_awaiting,
    )
    expected: list[dict[str, Any]] = []
    got: list[dict[str, Any]] = []
    lasts: list[str | None] = []
    for i, (from_client, data) in enumerate(events):
        now = 1000.0 + i * 0.25
        records = py.client(data, now) if from_client else py.backend(data, now)
        counted = c.client(data, now) if from_client else c.backend(data, now)
        assert counted == len(records)
        expected += [with_context(r) for r in records]
        lines, count = c.take()
        assert count == len(records) == lines.count(b"\n")
        got += [json.loads(b"{" + line + b"}") for line in lines.splitlines()]
        assert c.last_statement == py.last_statement
        assert c.retained_bytes == py.retained_bytes <= 2 * budget
        assert c.awaiting == py.awaiting <= max_awaiting
        assert c.limited == py.limited
        lasts.append(c.last_statement)
    return expected, got, lasts


def same(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        want, have = dict(want), dict(have)
        if "duration_ms" in want:
            assert abs(want.pop("duration_ms") - have.pop("duration_ms")) < 1e-6
        assert have == want


@settings(max_examples=400, deadline=None)
@given(
    front=st.lists(front_message(), max_size=12),
    back=st.lists(back_message(), max_size=12),
    mode=st.sampled_from(["none", "hash", "full"]),
    cap=st.sampled_from([1, 3, 8, 64, 65536]),
    budget=st.sampled_from([1, 200, 230, 300, 400, 600, 900, 4 << 20]),
    max_awaiting=st.sampled_from([1, 2, 3, 5, 65536]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_c_tracker_records_what_the_reference_records(
    front: list[bytes],
    back: list[bytes],
    mode: ParameterMode,
    cap: int,
    budget: int,
    max_awaiting: int,
    seed: int,
) -> None:
    """Random message sequences (simple, extended, pipelines, COPY, errors, malformed
    bodies, invalid UTF-8), each direction split at random places and the two interleaved
    at random, under session budgets small enough to evict and drop statements and
    portals, and limits on the statements awaiting answers low enough to be hit (the
    ``audit_limit`` record, then nothing more): the C tracker's records are the reference
    tracker's, record for record, and both retain and await the same."""
    rng = random.Random(seed)
    fc, bc = chunks(rng, b"".join(front)), chunks(rng, b"".join(back))
    events: list[tuple[bool, bytes]] = []
    while fc or bc:
        if fc and (not bc or rng.random() < 0.5):
            events.append((True, fc.pop(0)))
        else:
            events.append((False, bc.pop(0)))
    expected, got, _ = run_both(events, mode, cap, budget, max_awaiting)
    same(expected, got)


@st.composite
def named_message(draw: st.DrawFn) -> bytes:
    """Parse, Bind, Execute, Close and Sync only: what fills and empties the tables."""
    kind = draw(st.sampled_from("PPPBBEEECS"))
    if kind == "P":
        return msg(b"P", draw(names) + b"\0" + draw(texts) + b"\0" + struct.pack("!h", 0))
    if kind == "B":
        body = draw(names) + b"\0" + draw(names) + b"\0" + draw(params())
        return msg(b"B", body + struct.pack("!h", 0))
    if kind == "E":
        return msg(b"E", draw(names) + b"\0" + struct.pack("!i", 0))
    if kind == "C":
        return msg(b"C", draw(st.sampled_from([b"S", b"P"])) + draw(names) + b"\0")
    return msg(b"S")


#: The server's answers to what fills the tables: confirmations, results, an error.
confirmations = st.sampled_from(
    [msg(b"1"), msg(b"2"), msg(b"3"), msg(b"C", b"SELECT 1\0"), msg(b"Z", b"I"),
     msg(b"E", b"C42P05\0\0"), msg(b"C", b"DEALLOCATE ALL\0")]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    front=st.lists(named_message(), max_size=24),
    back=st.lists(confirmations, max_size=24),
    mode=st.sampled_from(["none", "hash", "full"]),
    cap=st.sampled_from([3, 64, 65536]),
    budget=st.sampled_from([200, 230, 300, 400, 500, 600, 900]),
    seed=st.integers(0, 2**32 - 1),
)
def test_eviction_is_the_same_in_both_trackers(
    front: list[bytes], back: list[bytes], mode: ParameterMode, cap: int, budget: int, seed: int
) -> None:
    """Statements and portals filling budgets a few entries wide, changed when the server
    confirms them (and not when it refuses them): the same texts and parameters evicted,
    the same entries forgotten, the same records (``text_evicted`` with the hash,
    ``parameters_evicted``, ``portal_evicted``, ``text_unconfirmed``) in both trackers."""
    rng = random.Random(seed)
    fc = chunks(rng, b"".join(front))
    events: list[tuple[bool, bytes]] = []
    for answer in back:
        events += [(True, chunk) for chunk in fc[: rng.randrange(4)]]
        del fc[:3]
        events.append((False, answer))
    events += [(True, chunk) for chunk in fc]
    expected, got, _ = run_both(events, mode, cap, budget)
    same(expected, got)


def q(text: bytes) -> bytes:
    return msg(b"Q", text + b"\0")


def bind(stmt: bytes, vals: list[bytes | None], fmt: int = 0) -> bytes:
    body = b"\0" + stmt + b"\0" + struct.pack("!hh", 1, fmt) + struct.pack("!h", len(vals))
    for v in vals:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return msg(b"B", body + struct.pack("!h", 0))


@pytest.mark.parametrize("split", [4093, 65536, 1 << 21])
@pytest.mark.parametrize("mode", ["none", "hash", "full"])
def test_oversized_texts_are_cut_marked_and_hashed_at_every_split(
    split: int, mode: ParameterMode
) -> None:
    """A 1 MiB query, statement and parameter (with invalid UTF-8 at the cut), however it
    arrives: recorded cut to the bound with the SHA-256 of the whole, as the reference."""
    big = ("é" * (1 << 19)).encode() + b"\xff tail"
    stream = (
        q(big)
        + msg(b"P", b"s1\0" + big + b"\0" + struct.pack("!h", 0))
        + bind(b"s1", [big, None, b"\x00\x01"], fmt=0)
        + msg(b"E", b"\0" + struct.pack("!i", 0))
        + msg(b"S")
    )
    events = [(True, stream[i : i + split]) for i in range(0, len(stream), split)]
    events.append((False, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")))
    events.append((False, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")))
    expected, got, _ = run_both(events, mode, 65536)
    same(expected, got)
    digest = hashlib.sha256(big).hexdigest()
    query, parse, execute = got[0], got[1], got[2]
    for rec in (query, parse, execute):
        assert rec["text_truncated"] is True and rec["text_bytes"] == len(big)
        assert rec["text_sha256"] == digest and len(rec["text"].encode()) <= 65536
    if mode == "hash":
        assert execute["parameters"][0] == digest
    if mode == "full":
        assert execute["parameters"][0]["sha256"] == digest
        assert execute["parameters"][0]["truncated"] is True


def test_records_carry_the_identity_and_a_wall_clock_time() -> None:
    c = session_tracker(CONTEXT, parameters="hash")
    c.client(q(b"select 1"), 1.0)
    c.backend(msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"), 1.5)
    lines, count = c.take()
    query, result = (json.loads(b"{" + line + b"}") for line in lines.splitlines())
    assert count == 2
    assert {k: query[k] for k in CONTEXT} == CONTEXT
    assert {k: result[k] for k in ("instance", "conn_id", "login", "node", "database")} == {
        k: CONTEXT[k] for k in ("instance", "conn_id", "login", "node", "database")
    }
    assert "role" not in result and result["duration_ms"] == 500.0
    for rec in (query, result):
        assert rec["time"].endswith("+00:00") and len(rec["time"]) == len(
            "2026-01-01T00:00:00.000000+00:00"
        )
    assert c.take() == (b"", 0)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="parameters"):
        session_tracker(CONTEXT, parameters="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_statement_bytes"):
        session_tracker(CONTEXT, max_statement_bytes=0)


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    seq=st.integers(0, 10**12),
)
def test_the_c_chain_links_lines_as_the_sink_defines(bodies: list[bytes], seq: int) -> None:
    """Each line is {"seq":N,"prev":"<SHA-256 of the line before>",<members>}; the chain
    continues from the hash and seq it is given."""
    prev = hashlib.sha256(b"x").hexdigest() if seq else GENESIS
    joined = b"".join(body + b"\n" for body in bodies)
    lines, last, last_seq = _pump.audit_chain(prev, seq, joined)
    out = lines.split(b"\n")[:-1]
    assert lines.endswith(b"\n") or not bodies
    assert len(out) == len(bodies) and last_seq == seq + len(bodies)
    for body, line in zip(bodies, out, strict=True):
        seq += 1
        assert line == b'{"seq":%d,"prev":"%s",%s}' % (seq, prev.encode(), body)
        prev = line_hash(line)
    assert last == prev


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_sha256_is_sha256(data: bytes) -> None:
    assert _pump.sha256(data) == hashlib.sha256(data).hexdigest()


def test_encoded_dict_records_match_the_c_encoding() -> None:
    """The sink's encoding of a reference record is the C tracker's line, byte for byte
    (context first, then the record's members in the same order)."""
    py = AuditTracker(CONTEXT, parameters="full")
    c = session_tracker(CONTEXT, parameters="full", wall_clock=False)
    stream = (
        q(b'select "x"\n')
        + msg(b"P", b"s\0select $1\0\0\0")
        + bind(b"s", [b"v\xc3\xa9", None])
        + msg(b"E", b"\0\0\0\0\0")
    )
    records = py.client(stream, 1.0)
    c.client(stream, 1.0)
    lines, _ = c.take()
    assert [encode_body(r) for r in records] == lines.splitlines()
