"""The sans-IO responder of the console database: bytes in, events and bytes out, no sockets.
Session start, simple Query, the extended protocol (Parse / Bind / Describe / Execute / Sync /
Close), errors (with their position) and the skip-until-Sync rule, Terminate, and garbage."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.pgwire import BackendKeyData, build_message
from waypoint.pgwire.responder import (
    TEXT_OID,
    Responder,
    Result,
    Statement,
    StatementError,
    Terminated,
)


def describe(sql: str) -> tuple[str, ...] | StatementError:
    if sql.startswith("SHOW"):
        return ("a", "b")
    if sql.startswith("BAD"):
        return StatementError("42601", "syntax error", 5)
    return ()


def answer_for(sql: str) -> Result | StatementError:
    if sql.startswith("SHOW"):
        return Result("SHOW 2", ("a", "b"), (("1", None), ("x", "é")))
    if sql == "FAIL":
        return StatementError("42501", "permission denied")
    return Result(sql.split()[0].upper())


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        kind = data[pos : pos + 1]
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((kind, data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data)
    return out


def kinds(data: bytes) -> bytes:
    return b"".join(k for k, _ in messages(data))


def fields(body: bytes) -> dict[str, str]:
    return {p[:1].decode(): p[1:].decode() for p in body.split(b"\0") if p}


def run(responder: Responder, data: bytes) -> tuple[bytes, list[Statement | Terminated]]:
    """Feed ``data``, answer every statement, return (bytes out, events)."""
    responder.feed(data)
    events: list[Statement | Terminated] = []
    while (event := responder.next_event()) is not None:
        events.append(event)
        if isinstance(event, Statement):
            responder.answer(answer_for(event.sql))
    return responder.data_to_send(), events


def new() -> Responder:
    return Responder(describe, {"server_version": "16.0", "client_encoding": "UTF8"}, BackendKeyData(7, b"abcd"))


def q(sql: str) -> bytes:
    return build_message(b"Q", sql.encode() + b"\0")


def parse_msg(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    body = name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", len(types))
    body += b"".join(struct.pack("!i", t) for t in types)
    return build_message(b"P", body)


def bind(statement: str = "", portal: str = "", result_formats: tuple[int, ...] = (), params: tuple[bytes | None, ...] = ()) -> bytes:
    body = portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!h", 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return build_message(b"B", body)


def describe_msg(kind: bytes, name: str = "") -> bytes:
    return build_message(b"D", kind + name.encode() + b"\0")


def execute(portal: str = "") -> bytes:
    return build_message(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


SYNC = build_message(b"S")


def test_start() -> None:
    out = new().start()
    assert kinds(out) == b"RSSKZ"
    msgs = messages(out)
    assert msgs[0][1] == b"\0\0\0\0"
    assert msgs[1][1] == b"server_version\x0016.0\x00"
    assert msgs[3][1] == struct.pack("!i", 7) + b"abcd"
    assert msgs[4][1] == b"I"


def test_simple_query_result_set() -> None:
    out, events = run(new(), q("SHOW x"))
    assert events == [Statement("SHOW x", extended=False)]
    assert kinds(out) == b"TDDCZ"
    msgs = messages(out)
    (ncols,) = struct.unpack_from("!h", msgs[0][1])
    assert ncols == 2 and msgs[0][1][2:4] == b"a\0"
    assert struct.unpack_from("!ihihih", msgs[0][1], 4) == (0, 0, TEXT_OID, -1, -1, 0)
    assert msgs[1][1] == struct.pack("!hi", 2, 1) + b"1" + struct.pack("!i", -1)
    assert msgs[2][1] == struct.pack("!hi", 2, 1) + b"x" + struct.pack("!i", 2) + "é".encode()
    assert msgs[3][1] == b"SHOW 2\0"


def test_simple_query_error_has_position_and_session_goes_on() -> None:
    r = new()
    out, events = run(r, q("BAD input") + q("KILL x"))
    assert events == [Statement("KILL x", extended=False)]  # the bad one never ran
    assert kinds(out) == b"EZCZ"
    err = fields(messages(out)[0][1])
    assert err["C"] == "42601" and err["P"] == "5" and err["S"] == "ERROR"


def test_empty_query() -> None:
    out, events = run(new(), q("  ;"))
    assert events == [] and kinds(out) == b"IZ"


def test_extended_protocol_like_pgjdbc() -> None:
    out, events = run(new(), parse_msg("SHOW x") + bind(result_formats=(0,)) + describe_msg(b"P") + execute() + SYNC)
    assert events == [Statement("SHOW x", extended=True)]
    assert kinds(out) == b"12TDDCZ"


def test_extended_named_statement_described_then_executed_twice() -> None:
    data = parse_msg("SHOW x", "s1", (0,)) + describe_msg(b"S", "s1") + SYNC
    data += bind("s1", "p", (1,), (b"v",)) + execute("p") + bind("s1", "p") + execute("p") + SYNC
    out, events = run(new(), data)
    assert len(events) == 2
    assert kinds(out) == b"1tTZ" + b"2DDC" + b"2DDCZ"
    params = messages(out)[1][1]
    assert params == struct.pack("!hi", 1, TEXT_OID)


def test_extended_no_rows_statement() -> None:
    out, _ = run(new(), parse_msg("KILL y") + bind() + describe_msg(b"P") + execute() + SYNC)
    assert kinds(out) == b"12nCZ"


def test_extended_error_skips_until_sync() -> None:
    r = new()
    data = parse_msg("BAD one") + bind() + describe_msg(b"P") + execute() + SYNC
    data += parse_msg("SHOW x") + bind() + execute() + SYNC
    out, events = run(r, data)
    assert events == [Statement("SHOW x", extended=True)]
    assert kinds(out) == b"EZ" + b"12DDCZ"
    assert fields(messages(out)[0][1])["P"] == "5"


def test_answer_error_in_extended_protocol() -> None:
    out, events = run(new(), parse_msg("FAIL") + bind() + execute() + parse_msg("SHOW x") + SYNC)
    assert [e.sql for e in events if isinstance(e, Statement)] == ["FAIL"]
    assert kinds(out) == b"12EZ"
    assert fields(messages(out)[2][1])["C"] == "42501"


def test_unknown_statement_and_portal() -> None:
    out, _ = run(new(), bind("nope") + SYNC + describe_msg(b"P", "nope") + SYNC + execute("nope") + SYNC)
    msgs = messages(out)
    assert kinds(out) == b"EZEZEZ"
    assert fields(msgs[0][1])["C"] == "26000" and fields(msgs[2][1])["C"] == "34000"


def test_close_and_flush() -> None:
    out, _ = run(new(), parse_msg("SHOW x", "s") + build_message(b"C", b"Ss\0") + build_message(b"H") + SYNC)
    assert kinds(out) == b"13Z"


def test_transaction_status_follows_begin_commit_and_errors() -> None:
    r = new()
    out, _ = run(r, q("BEGIN"))
    assert messages(out)[-1][1] == b"T"
    out, _ = run(r, q("BAD x"))
    assert messages(out)[-1][1] == b"E"
    out, _ = run(r, q("ROLLBACK"))
    assert messages(out)[-1][1] == b"I"


def test_terminate() -> None:
    out, events = run(new(), build_message(b"X"))
    assert events == [Terminated()] and out == b""


def test_unsupported_message_is_an_error_not_a_crash() -> None:
    out, events = run(new(), build_message(b"F", b"\0\0\0\0") + q("KILL z"))
    assert len(events) == 1
    assert kinds(out) == b"EZCZ"
    assert fields(messages(out)[0][1])["C"] == "0A000"


def test_malformed_message_ends_with_fatal() -> None:
    out, events = run(new(), build_message(b"P", b"no terminator"))
    assert len(events) == 1 and isinstance(events[0], Terminated)
    err = fields(messages(out)[0][1])
    assert err["S"] == "FATAL" and err["C"] == "08P01"
    # Nothing more after the FATAL.
    assert run(Responder(describe, {}, BackendKeyData(1, b"abcd")), b"")[0] == b""


def test_oversized_message_is_refused_before_it_is_buffered() -> None:
    r = new()
    r.feed(b"Q" + struct.pack("!I", 64 * 1024 * 1024))
    event = r.next_event()
    assert isinstance(event, Terminated)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data: bytes) -> None:
    r = new()
    run(r, data)


@settings(max_examples=200)
@given(st.lists(st.sampled_from([q("SHOW x"), q("BAD"), parse_msg("SHOW x"), parse_msg("BAD"), bind(), describe_msg(b"P"), describe_msg(b"S"), execute(), SYNC, build_message(b"H")]), max_size=20))
def test_any_sequence_of_valid_messages_stays_well_formed(parts: list[bytes]) -> None:
    out, _ = run(new(), b"".join(parts))
    messages(out)  # every byte belongs to a whole message
