"""Names change when the server confirms them, and the server's skipping after an error is
followed, in both trackers (the C one sessions run and the Python reference): a Parse,
Bind or Close the server refuses or skips never changes what a later Execute is recorded
with; a message the server ignores up to Sync is recorded as not run and never takes
another's result; and after SQL PREPARE / DEALLOCATE an Execute of a named statement says
its text is not confirmed. Sans I/O: the server's answers are written by hand."""

from __future__ import annotations

import struct
from typing import Any

import test_audit_memory

SECRET = "select v from t /* the real read */"
DECOY = "select 'harmless' /* decoy */"


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def parse(name: str, text: str) -> bytes:
    return msg(b"P", name.encode() + b"\0" + text.encode() + b"\0" + struct.pack("!h", 0))


def bind(portal: str, statement: str) -> bytes:
    body = portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0)
    return msg(b"B", body)


def execute(portal: str = "") -> bytes:
    return msg(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


def close(what: str, name: str) -> bytes:
    return msg(b"C", what.encode() + name.encode() + b"\0")


def describe(what: str, name: str) -> bytes:
    return msg(b"D", what.encode() + name.encode() + b"\0")


def query(text: str) -> bytes:
    return msg(b"Q", text.encode() + b"\0")


def function_call(oid: int) -> bytes:
    return msg(b"F", struct.pack("!ihhh", oid, 0, 0, 0))


SYNC = msg(b"S")
READY = msg(b"Z", b"I")
PARSED, BOUND, CLOSED = msg(b"1"), msg(b"2"), msg(b"3")


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def error(sqlstate: str) -> bytes:
    return msg(b"E", b"SERROR\0C" + sqlstate.encode() + b"\0Mno\0\0")


class Both(test_audit_memory.Both):
    """The C and the reference tracker fed the same bytes (the same records), which it
    keeps."""

    def __init__(self) -> None:
        super().__init__(budget=4 << 20, parameters="none")
        self.records: list[dict[str, Any]] = []

    def feed(self, client: bool, data: bytes) -> list[dict[str, Any]]:
        got = super().feed(client, data)
        self.records += got
        return got

    def step(self, client: bytes, server: bytes) -> list[dict[str, Any]]:
        """The client's bytes, then the server's answers: the records of both."""
        return self.feed(True, client) + self.feed(False, server)

    def result_of(self, record: dict[str, Any]) -> dict[str, Any]:
        (res,) = [
            r
            for r in self.records
            if r["event"] == "result" and r["statement_id"] == record["statement_id"]
        ]
        return res


def last(records: list[dict[str, Any]], event: str) -> dict[str, Any]:
    return [r for r in records if r["event"] == event][-1]


def test_a_refused_reparse_changes_nothing() -> None:
    """The server refuses a Parse of a name it has (42P05): the name keeps its text, and
    the refused Parse's record has an error result."""
    both = Both()
    both.step(parse("s", SECRET) + SYNC, PARSED + READY)
    decoy = last(both.step(parse("s", DECOY) + SYNC, error("42P05") + READY), "parse")
    assert both.result_of(decoy)["status"] == "error"
    assert both.result_of(decoy)["sqlstate"] == "42P05"
    rec = last(both.step(bind("", "s") + execute() + SYNC, BOUND + complete("SELECT 1") + READY),
               "execute")  # fmt: skip
    assert rec["text"] == SECRET and "text_unconfirmed" not in rec
    assert both.result_of(rec)["status"] == "ok"
    assert both.py.retained_bytes == both.c.retained_bytes > 0


def test_a_parse_and_close_skipped_after_an_error_change_nothing() -> None:
    """After an error the server skips everything up to Sync, a Close and a Parse too: the
    name keeps its text; the skipped Parse is recorded as not run."""
    both = Both()
    both.step(parse("s", SECRET) + SYNC, PARSED + READY)
    recs = both.step(
        bind("", "no_such") + close("S", "s") + parse("s", DECOY) + SYNC, error("26000") + READY
    )
    assert both.result_of(last(recs, "parse"))["status"] == "not_run"
    rec = last(both.step(bind("", "s") + execute() + SYNC, BOUND + complete("SELECT 1") + READY),
               "execute")  # fmt: skip
    assert rec["text"] == SECRET


def test_a_close_confirmed_forgets_the_name() -> None:
    both = Both()
    both.step(parse("s", SECRET) + SYNC, PARSED + READY)
    both.step(close("S", "s") + SYNC, CLOSED + READY)
    rec = last(both.step(bind("", "s") + execute() + SYNC, error("26000") + READY), "execute")
    assert rec["text"] is None
    assert both.result_of(rec)["status"] == "error"


def test_a_refused_or_skipped_bind_of_a_named_portal_changes_nothing() -> None:
    """A Bind of a named portal that exists is refused (42P03), one after an error is
    skipped: an Execute of the portal is recorded with the statement it was bound to."""
    both = Both()
    both.step(parse("a", SECRET) + parse("b", DECOY) + SYNC, PARSED + PARSED + READY)
    both.step(bind("p", "a") + SYNC, BOUND + READY)
    both.step(bind("p", "b") + SYNC, error("42P03") + READY)
    both.step(bind("", "no_such") + bind("p", "b") + SYNC, error("26000") + READY)
    rec = last(both.step(execute("p") + SYNC, complete("SELECT 1") + READY), "execute")
    assert (rec["statement"], rec["text"]) == ("a", SECRET)


def test_a_pipeline_records_the_text_it_binds_before_the_server_confirms() -> None:
    """Parse, Bind, Execute, Sync sent at once (as drivers do): the Execute is recorded
    with its Parse's text, not yet confirmed but in the same segment (if the Parse fails,
    the Execute does not run), so nothing marks it."""
    both = Both()
    both.step(parse("s", DECOY) + SYNC, PARSED + READY)
    recs = both.feed(True, close("S", "s") + parse("s", SECRET) + bind("", "s") + execute() + SYNC)
    rec = last(recs, "execute")
    assert rec["text"] == SECRET and "text_unconfirmed" not in rec
    both.feed(False, CLOSED + PARSED + BOUND + complete("SELECT 1") + READY)
    assert both.result_of(rec)["status"] == "ok"
    assert both.py.awaiting == both.c.awaiting == 0


def test_an_execute_after_a_sync_behind_an_unanswered_parse_is_marked_unconfirmed() -> None:
    """A Parse, Sync, then an Execute of its name, sent before the server answered: the
    server may refuse the Parse and run the Execute with the name's old text, so the
    Execute's text (the Parse's) is marked as not confirmed."""
    both = Both()
    both.step(parse("s", SECRET) + SYNC, PARSED + READY)
    recs = both.feed(True, parse("s", DECOY) + SYNC + bind("", "s") + execute() + SYNC)
    rec = last(recs, "execute")
    assert rec["text"] == DECOY and rec["text_unconfirmed"] is True
    both.feed(False, error("42P05") + READY + BOUND + complete("SELECT 1") + READY)
    # Refused: the name kept its first text, what a later Execute is recorded with.
    rec = last(both.step(bind("", "s") + execute() + SYNC, BOUND + complete("SELECT 1") + READY),
               "execute")  # fmt: skip
    assert rec["text"] == SECRET and "text_unconfirmed" not in rec


def test_a_query_the_server_ignores_after_an_error_is_not_run_and_shifts_nothing() -> None:
    """An extended-protocol error, then a simple Query before the Sync: the server ignores
    the Query (no answer). It is recorded as not run; the next Query's result is its own."""
    for failing, answers in (
        (parse("", "select from where"), error("42601")),
        (parse("", "select 1/0") + bind("", "") + execute(), PARSED + BOUND + error("22012")),
        (describe("S", "no_such"), error("26000")),
        (bind("", "no_such"), error("26000")),
    ):
        both = Both()
        recs = both.step(failing + query("select 'ignored'") + function_call(1598) + SYNC,
                         answers + READY)  # fmt: skip
        ignored = last(recs, "query")
        assert both.result_of(ignored)["status"] in ("not_run", "error")
        assert both.result_of(last(recs, "function_call"))["status"] == "not_run"
        secret = last(both.step(query(SECRET), complete("SELECT 1") + READY), "query")
        cover = last(both.step(query("select 1/0"), error("22012") + READY), "query")
        assert both.result_of(secret)["status"] == "ok"
        assert both.result_of(secret)["tag"] == "SELECT 1"
        assert both.result_of(cover)["sqlstate"] == "22012"
        assert both.py.awaiting == both.c.awaiting == 0


def test_a_describe_is_paired_with_its_answer() -> None:
    """Describe waits for its RowDescription or NoData: the Execute behind it is paired
    with its own result, and an error of the Describe keeps the rest from running."""
    both = Both()
    both.step(parse("s", SECRET) + SYNC, PARSED + READY)
    answers = msg(b"t", b"\0\0") + msg(b"T", b"\0\0") + BOUND + complete("SELECT 1") + READY
    rec = last(both.step(describe("S", "s") + bind("", "s") + execute() + SYNC, answers),
               "execute")  # fmt: skip
    assert both.result_of(rec)["status"] == "ok"
    rec = last(both.step(describe("S", "x") + bind("", "s") + execute() + SYNC,
                         error("26000") + READY), "execute")  # fmt: skip
    assert both.result_of(rec)["status"] == "error"
    assert both.py.awaiting == both.c.awaiting == 0


def test_after_sql_prepare_a_named_statement_is_marked_unconfirmed_until_parsed_again() -> None:
    """A PREPARE or DEALLOCATE command tag: SQL may have given any name another text, so an
    Execute of a named statement carries ``text_unconfirmed`` (with its last Parse's text)
    until the name is parsed again and confirmed; the unnamed statement is not SQL's."""
    both = Both()
    both.step(parse("s", DECOY) + parse("", DECOY) + SYNC, PARSED + PARSED + READY)
    both.step(
        query(f"deallocate s; prepare s as {SECRET}"),
        complete("DEALLOCATE") + complete("PREPARE") + READY,
    )
    rec = last(both.step(bind("", "s") + execute() + SYNC, BOUND + complete("SELECT 1") + READY),
               "execute")  # fmt: skip
    assert rec["text"] == DECOY and rec["text_unconfirmed"] is True
    rec = last(both.step(bind("", "") + execute() + SYNC, BOUND + complete("SELECT 1") + READY),
               "execute")  # fmt: skip
    assert "text_unconfirmed" not in rec
    rec = last(both.step(bind("", "unknown") + execute() + SYNC, BOUND + complete("SELECT 1")
                         + READY), "execute")  # fmt: skip
    assert rec["text"] is None and rec["text_unconfirmed"] is True
    both.step(close("S", "s") + parse("s", SECRET) + SYNC, CLOSED + PARSED + READY)
    rec = last(both.step(bind("", "s") + execute() + SYNC, BOUND + complete("SELECT 1") + READY),
               "execute")  # fmt: skip
    assert rec["text"] == SECRET and "text_unconfirmed" not in rec


def test_sql_prepare_pipelined_before_an_execute_marks_its_result() -> None:
    """The PREPARE's tag comes after the Execute was recorded (sent in one write): the
    Execute's result says its text is not confirmed."""
    both = Both()
    both.step(parse("s", DECOY) + SYNC, PARSED + READY)
    recs = both.feed(True, query("deallocate all") + bind("", "s") + execute() + SYNC)
    rec = last(recs, "execute")
    assert "text_unconfirmed" not in rec
    both.feed(False, complete("DEALLOCATE ALL") + READY + BOUND + complete("SELECT 1") + READY)
    assert both.result_of(rec)["text_unconfirmed"] is True


def test_an_execute_of_a_cursor_no_bind_made_names_no_statement() -> None:
    """A named portal no Bind made is a cursor SQL opened (DECLARE, or PL/pgSQL): its
    Execute is recorded with no statement and no text (``portal_unknown``), never with the
    unnamed statement's text; the unnamed portal itself still means the unnamed statement."""
    both = Both()
    both.step(parse("", DECOY) + SYNC, PARSED + READY)
    both.step(query(f"declare c cursor with hold for {SECRET}"), complete("DECLARE CURSOR") + READY)
    rec = last(both.step(execute("c") + SYNC, complete("SELECT 1") + READY), "execute")
    assert rec["statement"] is None and rec["text"] is None and rec["portal_unknown"] is True
    assert both.result_of(rec)["status"] == "ok"
    rec = last(both.step(bind("", "") + execute() + SYNC, BOUND + complete("SELECT 1") + READY),
               "execute")  # fmt: skip
    assert rec["text"] == DECOY and "portal_unknown" not in rec


def test_after_sql_cursor_commands_a_named_portal_is_marked_unconfirmed() -> None:
    """Cursors and portals share one namespace: after a DECLARE / CLOSE CURSOR tag, an
    Execute of a portal bound before it carries ``text_unconfirmed`` (SQL may have closed it
    and opened a cursor of the same name), until it is bound again and confirmed; pipelined,
    the result says so."""
    both = Both()
    both.step(parse("s", DECOY) + bind("c", "s") + SYNC, PARSED + BOUND + READY)
    rec = last(both.step(execute("c") + SYNC, complete("SELECT 1") + READY), "execute")
    assert rec["text"] == DECOY and "text_unconfirmed" not in rec
    both.step(
        query(f"close c; declare c cursor with hold for {SECRET}"),
        complete("CLOSE CURSOR") + complete("DECLARE CURSOR") + READY,
    )
    rec = last(both.step(execute("c") + SYNC, complete("SELECT 1") + READY), "execute")
    assert rec["text"] == DECOY and rec["text_unconfirmed"] is True
    both.step(bind("c", "s") + SYNC, BOUND + READY)
    rec = last(both.step(execute("c") + SYNC, complete("SELECT 1") + READY), "execute")
    assert "text_unconfirmed" not in rec
    recs = both.feed(True, query("close all") + execute("c") + SYNC)
    rec = last(recs, "execute")
    assert "text_unconfirmed" not in rec
    both.feed(False, complete("CLOSE CURSOR ALL") + READY + complete("SELECT 1") + READY)
    assert both.result_of(rec)["text_unconfirmed"] is True
