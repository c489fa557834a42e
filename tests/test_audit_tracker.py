"""The sans-IO audit tracker: frontend messages recorded, backend answers paired, no sockets."""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.audit.tracker import AuditTracker, with_context


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def query(text: str) -> bytes:
    return msg(b"Q", text.encode() + b"\0")


def parse(name: str, text: str) -> bytes:
    return msg(b"P", name.encode() + b"\0" + text.encode() + b"\0" + struct.pack("!h", 0))


def bind(stmt: str, params: list[bytes | None], portal: str = "", binary: bool = False) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0"
    body += struct.pack("!hh", 1, 1 if binary else 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return msg(b"B", body + struct.pack("!h", 0))


def execute(portal: str = "") -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


def close_stmt(name: str) -> bytes:
    return msg(b"C", b"S" + name.encode() + b"\0")


SYNC = msg(b"S")
READY = msg(b"Z", b"I")


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def error(sqlstate: str) -> bytes:
    return msg(b"E", b"SERROR\0VERROR\0C" + sqlstate.encode() + b"\0Mboom\0\0")


def tracker(**kw: Any) -> AuditTracker:
    return AuditTracker({"login": "alice@example.com", "conn_id": "c1"}, **kw)


def test_simple_query_and_its_result() -> None:
    t = tracker()
    (rec,) = t.client(query("select 1"), 10.0)
    assert rec["event"] == "query" and rec["protocol"] == "simple" and rec["text"] == "select 1"
    full = with_context(rec)
    assert full["login"] == "alice@example.com" and full["conn_id"] == "c1"
    assert t.last_statement == "select 1"
    (res,) = t.backend(msg(b"T", b"x") + msg(b"D", b"y") + complete("SELECT 1") + READY, 10.25)
    assert res["event"] == "result" and res["statement_id"] == rec["statement_id"]
    assert res["status"] == "ok" and res["tag"] == "SELECT 1" and res["duration_ms"] == 250.0
    assert with_context(res)["login"] == "alice@example.com"


def test_multi_statement_query_with_an_error_carries_the_sqlstate() -> None:
    t = tracker()
    t.client(query("select 1; select 1/0"), 0.0)
    (res,) = t.backend(complete("SELECT 1") + error("22012") + READY, 1.0)
    assert res["status"] == "error" and res["sqlstate"] == "22012" and res["tag"] == "SELECT 1"


def test_prepared_statement_executed_many_times_records_the_text_each_time() -> None:
    t = tracker()
    recs = t.client(parse("s1", "select $1::int") + SYNC, 0.0)
    assert [r["event"] for r in recs] == ["parse"]
    assert recs[0]["statement"] == "s1" and recs[0]["text"] == "select $1::int"
    t.backend(msg(b"1") + READY, 0.0)
    for i in range(5):
        recs = t.client(bind("s1", [str(i).encode()]) + execute() + SYNC, float(i))
        assert len(recs) == 1
        rec = recs[0]
        assert rec["event"] == "execute" and rec["text"] == "select $1::int"
        assert rec["statement"] == "s1" and rec["parameter_count"] == 1
        assert "parameters" not in rec  # parameters = "none"
        (res,) = t.backend(msg(b"2") + msg(b"D", b"r") + complete("SELECT 1") + READY, i + 0.5)
        assert res["statement_id"] == rec["statement_id"] and res["tag"] == "SELECT 1"
    # Closed: an Execute of that name no longer has a text (the server refuses it too).
    t.client(close_stmt("s1") + SYNC, 9.0)
    (rec,) = t.client(bind("s1", []) + execute() + SYNC, 9.0)
    assert rec["text"] is None


def test_unnamed_statement_is_remembered_until_replaced() -> None:
    t = tracker()
    recs = t.client(parse("", "select 42") + bind("", []) + execute() + SYNC, 0.0)
    assert [r["event"] for r in recs] == ["parse", "execute"]
    assert recs[1]["text"] == "select 42" and recs[1]["statement"] == ""
    recs = t.client(parse("", "select 43") + bind("", []) + execute() + SYNC, 0.0)
    assert recs[1]["text"] == "select 43"


def test_pipeline_pairs_results_in_order_and_skips_after_an_error() -> None:
    t = tracker()
    stream = b""
    for text in ("select 1", "select 1/0", "select 3"):
        stream += parse("", text) + bind("", []) + execute()
    stream += SYNC + parse("", "select 4") + bind("", []) + execute() + SYNC
    recs = t.client(stream, 0.0)
    execs = [r for r in recs if r["event"] == "execute"]
    assert [r["text"] for r in execs] == ["select 1", "select 1/0", "select 3", "select 4"]
    back = msg(b"1") + msg(b"2") + complete("SELECT 1")
    back += msg(b"1") + msg(b"2") + error("22012")  # the rest of the segment is skipped
    back += READY + msg(b"1") + msg(b"2") + complete("SELECT 1") + READY
    res = t.backend(back, 1.0)
    ids = [r["statement_id"] for r in execs]
    # The Parse the server skipped has its own result (its text never took effect).
    skipped = [r for r in recs if r["event"] == "parse"][2]["statement_id"]
    assert [r["status"] for r in res if r["statement_id"] == skipped] == ["not_run"]
    got = [
        (r["statement_id"], r["status"], r.get("sqlstate")) for r in res if r["statement_id"] in ids
    ]
    assert got == [
        (ids[0], "ok", None),
        (ids[1], "error", "22012"),
        (ids[2], "not_run", None),
        (ids[3], "ok", None),
    ]
    assert not t.pending


def test_bind_error_is_charged_to_the_execute_that_did_not_run() -> None:
    t = tracker()
    (rec,) = t.client(bind("nope", []) + execute() + SYNC, 0.0)
    (res,) = t.backend(error("26000") + READY, 0.0)
    assert res["statement_id"] == rec["statement_id"] and res["sqlstate"] == "26000"


def test_portal_suspended() -> None:
    t = tracker()
    t.client(parse("", "select generate_series(1,10)") + bind("", []) + execute() + SYNC, 0.0)
    (res,) = t.backend(msg(b"1") + msg(b"2") + msg(b"D", b"x") + msg(b"s") + READY, 0.0)
    assert res["status"] == "suspended"


def test_copy_in_counts_rows_and_copy_data() -> None:
    t = tracker()
    (rec,) = t.client(query("copy t from stdin"), 0.0)
    (copy,) = t.backend(msg(b"G", b"\0\0\0"), 0.1)
    assert copy["event"] == "copy" and copy["direction"] == "in"
    assert copy["statement_id"] == rec["statement_id"]
    assert (
        t.client(msg(b"d", b"1\n") + msg(b"d", b"2\n") + msg(b"d", b"3\n") + msg(b"c"), 0.2) == []
    )
    (res,) = t.backend(complete("COPY 3") + READY, 0.3)
    assert res["rows"] == 3 and res["copy_data"] == 3 and res["tag"] == "COPY 3"


def test_copy_out_is_recorded() -> None:
    t = tracker()
    t.client(query("copy t to stdout"), 0.0)
    out = t.backend(
        msg(b"H", b"\0\0\0") + msg(b"d", b"x") + msg(b"c") + complete("COPY 1") + READY, 0.0
    )
    assert [r["event"] for r in out] == ["copy", "result"]
    assert out[0]["direction"] == "out" and out[1]["rows"] == 1


def test_function_call() -> None:
    t = tracker(parameters="full")
    body = struct.pack("!i", 1598) + struct.pack("!h", 0) + struct.pack("!h", 1)
    body += struct.pack("!i", 2) + b"42" + struct.pack("!h", 0)
    (rec,) = t.client(msg(b"F", body), 0.0)
    assert rec["event"] == "function_call" and rec["function_oid"] == 1598
    assert rec["parameters"] == [{"text": "42"}]
    (res,) = t.backend(msg(b"V", b"\0\0\0\1x") + READY, 0.0)
    assert res["status"] == "ok"


def test_parameters_hash_and_full() -> None:
    params: list[bytes | None] = [b"secret", None, b""]
    t = tracker(parameters="hash")
    t.client(parse("s", "select $1,$2,$3"), 0.0)
    (rec,) = t.client(bind("s", params) + execute(), 0.0)
    assert rec["parameters"] == [
        hashlib.sha256(b"secret").hexdigest(),
        None,
        hashlib.sha256(b"").hexdigest(),
    ]
    assert "secret" not in repr(rec)
    t = tracker(parameters="full")
    t.client(parse("s", "select $1"), 0.0)
    (rec,) = t.client(bind("s", [b"\xff\x00"], binary=True) + execute(), 0.0)
    assert rec["parameters"] == [{"hex": "ff00"}]


def test_a_huge_query_is_recorded_cut_with_the_hash_of_the_whole() -> None:
    cap = 1000
    t = tracker(max_statement_bytes=cap)
    text = ("select '" + "x" * (1 << 20) + "'").encode()
    data = msg(b"Q", text + b"\0")
    recs: list[dict[str, Any]] = []
    for i in range(0, len(data), 4096):
        recs += t.client(data[i : i + 4096], 0.0)
        body = t._front.body
        assert body is None or all(
            len(getattr(x, "kept", b"")) <= cap for x in body.req or () if hasattr(x, "kept")
        )
    (rec,) = recs
    assert rec["text"] == text[:cap].decode() and rec["text_truncated"] is True
    assert rec["text_bytes"] == len(text)
    assert rec["text_sha256"] == hashlib.sha256(text).hexdigest()


def test_a_huge_bind_parameter_is_recorded_cut_with_its_hash() -> None:
    t = tracker(parameters="full", max_statement_bytes=100)
    value = b"y" * (1 << 20)
    t.client(parse("s", "select $1"), 0.0)
    data = bind("s", [value]) + execute()
    recs: list[dict[str, Any]] = []
    for i in range(0, len(data), 65536):
        recs += t.client(data[i : i + 65536], 0.0)
    (rec,) = recs
    (param,) = rec["parameters"]
    assert param["text"] == "y" * 100 and param["truncated"] is True
    assert param["bytes"] == len(value) and param["sha256"] == hashlib.sha256(value).hexdigest()


def test_a_malformed_message_is_still_recorded() -> None:
    t = tracker()
    (rec,) = t.client(msg(b"Q", b"select 1"), 0.0)  # no NUL terminator
    assert rec["text"] == "select 1" and rec["malformed"] is True


def _mixed_stream() -> tuple[bytes, bytes]:
    front = query("select 1") + parse("a", "select $1") + bind("a", [b"v"]) + execute() + SYNC
    front += query("copy t from stdin") + msg(b"d", b"1\n") + msg(b"c")
    back = complete("SELECT 1") + READY + msg(b"1") + msg(b"2") + complete("SELECT 1") + READY
    back += msg(b"G", b"\0\0\0") + complete("COPY 1") + READY
    return front, back


def _run(front_cuts: list[int], back_cuts: list[int]) -> list[dict[str, Any]]:
    front, back = _mixed_stream()
    t = tracker(parameters="full")
    out: list[dict[str, Any]] = []
    for data, cuts, feed in ((front, front_cuts, t.client), (back, back_cuts, t.backend)):
        points = sorted({c % (len(data) + 1) for c in cuts})
        last = 0
        for p in [*points, len(data)]:
            out += feed(data[last:p], 0.0)
            last = p
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0), max_size=30), st.lists(st.integers(min_value=0), max_size=30)
)
def test_any_split_of_the_stream_gives_the_same_records(fc: list[int], bc: list[int]) -> None:
    assert _run(fc, bc) == _run([], [])


def test_byte_by_byte() -> None:
    front, back = _mixed_stream()
    assert _run(list(range(len(front))), list(range(len(back)))) == _run([], [])


@pytest.mark.parametrize("seed", range(3))
def test_random_frontend_noise_never_raises(seed: int) -> None:
    rng = random.Random(seed)
    t = tracker(parameters="hash")
    for _ in range(300):
        kind = rng.choice(b"QPBECFSdHDXcf")
        t.client(msg(bytes([kind]), rng.randbytes(rng.choice([0, 1, 3, 9, 40]))), 0.0)
        t.backend(
            msg(bytes([rng.choice(b"CEZIsGHW12")]), rng.randbytes(rng.choice([0, 2, 9]))), 0.0
        )


def test_a_huge_query_in_one_chunk_is_cut_the_same_way() -> None:
    text = ("select '" + "z" * 300_000 + "'").encode()
    (rec,) = tracker(max_statement_bytes=100).client(msg(b"Q", text + b"\0"), 0.0)
    assert rec["text"] == text[:100].decode() and rec["text_bytes"] == len(text)
    assert rec["text_sha256"] == hashlib.sha256(text).hexdigest()
