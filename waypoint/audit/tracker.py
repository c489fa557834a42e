"""The audit tracker of one session, sans I/O: the reference for the C tracker sessions run
(waypoint/proxy/relay/_audit.h; tests/test_audit_ctracker.py requires both to give the
same records for the same bytes, however split).

:class:`AuditTracker` is fed the bytes of a relayed session as they pass, in order:
``client(chunk, now)`` for frontend bytes, ``backend(chunk, now)`` for backend bytes.
Each call returns the records that chunk produced (plain dicts, ready for JSON). The
caller queues the records of a client chunk *before* it forwards the chunk, so no
statement reaches the server unrecorded.

What is recorded (``event``):

* ``query`` — a simple-protocol Query (its text);
* ``parse`` — a Parse (statement name and text); the name is remembered, so that
* ``execute`` — every Execute carries the text of the statement its portal was bound to
  (the unnamed statement too), ``text_unconfirmed`` when that text may not be the one the
  server runs (see below), and the Bind parameters per ``parameters``
  (``none``: only their count; ``hash``: the SHA-256 of each; ``full``: each as text, or
  hex when not UTF-8 / bound in binary);
* ``function_call`` — a FunctionCall (the function's OID, arguments as parameters);
* ``bind`` — a named portal's statement and parameters, when the session budget drops
  them from the portal (see below);
* ``copy`` — the server started a COPY (direction) for the statement before it;
* ``result`` — the server finished a query / execute / function call: ``tag`` (the last
  CommandComplete), ``commands`` (how many), ``sqlstate`` on error, ``rows`` for COPY,
  ``copy_data`` (CopyData messages the client sent), ``duration_ms``; ``status`` is
  ``ok``, ``error``, ``suspended`` or ``not_run`` (skipped after an earlier error in the
  same pipeline segment). A ``parse`` the server refuses or skips has one too (``error``,
  ``not_run``).

A Parse, Bind or Close changes a name when the server confirms it (ParseComplete,
BindComplete, CloseComplete, paired in order like the results); one it refuses (a name that
exists) or skips never does. After an error in an extended-protocol segment the server
ignores every message up to Sync, whatever its kind: each is skipped (``not_run``) rather
than waiting for an answer that never comes. An Execute is recorded when sent, with the
text of its name's newest change sent: should that change be in an earlier segment still
unanswered, the server may refuse it and run what was there before (``text_unconfirmed``).
SQL ``PREPARE`` / ``DEALLOCATE`` change names the tracker cannot follow (it does not read
SQL): after such a command tag an Execute of a named statement is ``text_unconfirmed``
until the name is parsed again and confirmed, and so is the result of an Execute recorded
before the tag and run after it. Cursors are portals by another name: an Execute of a
named portal no Bind made (a cursor SQL ``DECLARE`` opened) is recorded with no statement
and no text (``portal_unknown``), and after a ``DECLARE CURSOR`` / ``CLOSE CURSOR`` tag an
Execute of a portal bound before it is ``text_unconfirmed``, as for statements. Run from
PL/pgSQL (``PREPARE`` in ``EXECUTE``, ``OPEN`` of a named cursor) they show no tag: that
gap stays.

Size is no way around it: texts and parameters longer than ``max_statement_bytes`` are
cut, marked (``text_truncated``) and carry the SHA-256 of the whole (``text_sha256``),
computed incrementally; a message body is never buffered beyond the bound, however large.

Nor is the number of names: what the tracker keeps per session (prepared statements and
portals, each table on its own) is bounded by ``max_session_statement_bytes``, counted as
:data:`~waypoint.audit.names.ENTRY_COST` per entry plus its name, kept text and parameter
members (``retained_bytes``). Past the bound, the oldest kept statement texts are replaced
by their SHA-256 and length (an Execute of that statement is recorded with ``text_evicted``,
the length and the hash: its text is in the ``parse`` record with that hash) and the oldest
named portals lose their parameters, recorded then in a ``bind`` record (an Execute of the
portal carries ``parameters_evicted`` and that record's ``bind_id``); when that is not
enough, the oldest such entries are forgotten (an Execute of an unknown name is then
recorded with ``text_evicted`` or ``portal_evicted``, its name, and no text). The unnamed
portal, once confirmed, is never evicted nor counted (it is replaced by every Bind, and one
message's parameters keep at most ``max_statement_bytes`` together). Close frees entries.
Changes sent and not yet confirmed are kept and counted the same way, each under a key of
its own, with a mark of each name's newest (forgetting one forgets what its name had).

Nor is pipelining: statements, Parses, Binds, Closes, Describes and Syncs waiting for the
server's answer (``awaiting``) are at most ``max_awaiting``. One more (a client sending without reading the answers) makes
an ``audit_limit`` record after its own, and the tracker takes nothing more (``limited``):
the session must end, without forwarding the chunk that hit the limit.

How the bytes are read is :mod:`waypoint.audit.messages`; the names kept and their budget,
:mod:`waypoint.audit.names`.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

from .messages import (
    BACK_PARSED,
    BIND,
    CLOSE,
    COMMAND_COMPLETE,
    COPY_BOTH_RESPONSE,
    COPY_DATA,
    COPY_IN_RESPONSE,
    COPY_OUT_RESPONSE,
    DESCRIBE,
    EMPTY_QUERY_RESPONSE,
    ERROR_RESPONSE,
    EXECUTE,
    FRONT_PARSED,
    FUNCTION_CALL,
    PARSE,
    PORTAL_SUSPENDED,
    QUERY,
    READY_FOR_QUERY,
    SYNC,
    Framer,
    ParameterMode,
    Parser,
    Text,
    back_fast,
    back_parser,
    front_fast,
    front_parser,
)
from .names import Mark, Portal, Statement, Table, op_key

#: A record's session context: JSON object members (``"login":"…","node":"…"``), serialized
#: once per session; the sink writes them into the line in place of this key.
CONTEXT_KEY: Final = "_context"
#: The context fields a ``result`` or ``copy`` record carries.
SHORT_CONTEXT: Final = ("instance", "conn_id", "login", "node", "database")
Record = dict[str, Any]

#: Statements and Syncs waiting for the server's answer, at most (``awaiting``).
MAX_AWAITING: Final = 65536
#: The backend message that completes each kind of waiting message with no result of its
#: own: ParseComplete, BindComplete, CloseComplete, RowDescription or NoData (Describe).
_ANSWERS: Final = {
    b"1"[0]: ("parse",),
    b"2"[0]: ("bind",),
    b"3"[0]: ("close", "close_s", "close_p"),
    b"T"[0]: ("describe",),
    b"n"[0]: ("describe",),
}
#: Waiting messages the server answers with a result (the others change names, or describe).
_STATEMENTS: Final = ("query", "exec", "fcall")
#: Command tags of SQL that changes prepared statements behind the protocol's back.
_PREPARE_TAGS: Final = frozenset({"PREPARE", "DEALLOCATE", "DEALLOCATE ALL"})
#: Command tags of SQL that opens or closes cursors, which are portals by another name.
_CURSOR_TAGS: Final = frozenset({"DECLARE CURSOR", "CLOSE CURSOR", "CLOSE CURSOR ALL"})


class _Halt(Exception):
    """Past ``max_awaiting``: the rest of the chunk is not read."""


class AuditTracker:
    """Record the statements of one session and pair the server's answers with them."""

    def __init__(
        self,
        context: Mapping[str, Any],
        *,
        parameters: ParameterMode = "none",
        max_statement_bytes: int = 65536,
        max_session_statement_bytes: int = 4 << 20,
        wall_clock: Callable[[], float] | None = None,
        max_awaiting: int = MAX_AWAITING,
    ) -> None:
        if max_statement_bytes < 1:
            raise ValueError("max_statement_bytes must be >= 1")
        if max_session_statement_bytes < 1:
            raise ValueError("max_session_statement_bytes must be >= 1")
        if not 1 <= max_awaiting <= 1 << 24:
            raise ValueError("max_awaiting must be between 1 and 2**24")
        self.max_awaiting = max_awaiting
        #: Past ``max_awaiting``: the ``audit_limit`` record was made, nothing more is read.
        self.limited = False
        self.context = dict(context)
        #: The context as JSON members, serialized once (the sink splices it into each
        #: line: ``CONTEXT_KEY``); results and copy records carry a shorter one.
        self._ctx = context_members(self.context)
        self._ctx_short = context_members(
            {k: self.context[k] for k in SHORT_CONTEXT if k in self.context}
        )
        self.parameters = parameters
        self.cap = max_statement_bytes
        self._wall = wall_clock
        #: Prepared statements by name ("" is the unnamed one), and portals by name.
        self.statements = Table(max_session_statement_bytes)
        self.portals = Table(max_session_statement_bytes, pin="", on_evict=self._evict_portal)
        #: What the server answers next, in order: [kind, record-or-None, started].
        self.pending: deque[list[Any]] = deque()
        self.seq = 0
        #: The text of the current or last statement run (what a console shows).
        self.last_statement: str | None = None
        self._front = Framer(FRONT_PARSED, self._front_parser, self._on_front, front_fast(self.cap))
        self._back = Framer(BACK_PARSED, back_parser, self._on_back, back_fast)
        self._out: list[Record] = []
        self._now = 0.0
        #: The COPY the client is sending data for (its pending entry).
        self._copy_in: list[Any] | None = None
        #: An extended-protocol statement failed and the client has not sent Sync since:
        #: the server discards what comes until Sync, answering nothing, so a statement
        #: now is recorded ``not_run`` at once (waiting would keep it for an answer that
        #: never comes: a client could pile up millions).
        self._skipping = False
        #: Parses, Binds and Closes sent so far (each one's number, ``op``), Syncs sent,
        #: and PREPARE / DEALLOCATE command tags seen.
        self._ops = 0
        self._segment = 0
        self._epoch = 0
        #: DECLARE CURSOR / CLOSE CURSOR command tags seen: SQL that may have replaced what a
        #: portal name means (cursors and protocol portals share one namespace).
        self._cursor_epoch = 0

    @property
    def retained_bytes(self) -> int:
        """What the statement and portal tables hold (bounded: 2 x the session budget)."""
        return self.statements.retained + self.portals.retained

    @property
    def awaiting(self) -> int:
        """Statements and Syncs waiting for the server's answer."""
        return len(self.pending)

    # -- input ------------------------------------------------------------------------------

    def client(self, chunk: bytes, now: float) -> list[Record]:
        """Frontend bytes (in order): the records to queue before forwarding them."""
        self._now = now
        out: list[Record] = []
        if self.limited:
            return out
        self._out = out
        with contextlib.suppress(_Halt):
            self._front.feed(chunk)
        return out

    def backend(self, chunk: bytes, now: float) -> list[Record]:
        """Backend bytes (in order): the ``copy`` and ``result`` records they complete."""
        self._now = now
        out: list[Record] = []
        if self.limited:
            return out
        self._out = out
        self._back.feed(chunk)
        return out

    # -- frontend ---------------------------------------------------------------------------

    def _front_parser(self, kind: int) -> Parser:
        return front_parser(kind, self.cap, self.parameters)

    def _record(self, event: str, protocol: str, fields: dict[str, Any]) -> Record:
        self.seq += 1
        rec: Record = {"event": event, "statement_id": self.seq, "protocol": protocol}
        if self._wall is not None:
            rec["time"] = self._wall()
        rec[CONTEXT_KEY] = self._ctx
        rec.update(fields)
        self._out.append(rec)
        return rec

    def _on_front(self, kind: int, body: dict[str, Any] | None) -> None:
        now = self._now
        if kind == COPY_DATA:
            if self._copy_in is not None:
                self._copy_in[3] += 1
            return
        if kind == SYNC:
            self._skipping = False
            self._segment += 1
            self._wait(["sync", None, now, 0])
            return
        if kind == DESCRIBE:
            if not self._skipping:
                self._wait(["describe", None, now, 0, []])
            return
        if body is None:
            return
        if kind == QUERY:
            rec = self._record("query", "simple", _text_fields(body["text"]))
            rec.update(_malformed(body))
            self.last_statement = rec["text"]
            self._await(["query", rec, now, 0, []])
        elif kind == PARSE:
            name = body["name"]
            text: Text = body["text"]
            fields = _text_fields(text)
            rec = self._record(
                "parse", "extended", {"statement": name, **fields, **_malformed(body)}
            )
            entry = ["parse", rec, now, 0, []]
            if self._skipping:
                self._result(entry, "not_run")
            else:
                op = self._change(self.statements, name, body["name_len"], Statement(9, text))
                self._wait([*entry, op])
        elif kind == BIND:
            if not self._skipping:
                portal_ = Portal(9, body["statement"], body["statement_len"], body["params"])
                op = self._change(self.portals, body["portal"], body["portal_len"], portal_)
                self._wait(["bind", None, now, 0, [], op])
        elif kind == EXECUTE:
            portal = body["portal"]
            bound, bound_confirmed, unconfirmed = self._current(self.portals, portal)
            fields = {"statement": "", "portal": portal}
            watch: int | None = None
            cursor_watch: int | None = None
            if bound is None and (self.portals.dropped or portal):
                # Forgotten (the budget), or a named portal no Bind made: a cursor opened by
                # SQL (DECLARE, or PL/pgSQL). Its statement is not known here.
                fields.update(statement=None, text=None)
                fields["portal_evicted" if self.portals.dropped else "portal_unknown"] = True
                known = None
            else:
                if portal:
                    # DECLARE / CLOSE CURSOR since the Bind was confirmed: SQL may have
                    # replaced the portal by a cursor of the same name.
                    cursor_watch = self._cursor_epoch
                    if bound_confirmed and bound.epoch < self._cursor_epoch:
                        unconfirmed = True
                if bound is not None:
                    fields["statement"] = bound.statement
                sname = fields["statement"]
                known, confirmed, later = self._current(self.statements, sname)
                unconfirmed = unconfirmed or later
                if sname:
                    # SQL PREPARE / DEALLOCATE since this name's text was confirmed (or, no
                    # text known, at all): the server may run another text under it.
                    watch = self._epoch
                    stale = known is None or (confirmed and known.epoch < self._epoch)
                    unconfirmed = unconfirmed or (self._epoch > 0 and stale)
                if known is None:
                    fields["text"] = None  # unknown statement: the server will refuse it
                    if self.statements.dropped:
                        fields["text_evicted"] = True
                elif known.kept is None:
                    fields.update(text=None, text_evicted=True, text_bytes=known.size,
                                  text_sha256=known.sha)  # fmt: skip
                else:
                    fields["text"] = known.kept.decode("utf-8", "replace")
                    if known.truncated:
                        fields.update(
                            text_truncated=True, text_bytes=known.size, text_sha256=known.sha
                        )
            if unconfirmed:
                fields["text_unconfirmed"] = True
            if bound is not None:
                if bound.params is None:
                    fields.update(parameters_evicted=True, bind_id=bound.bind_id)
                else:
                    fields.update(bound.params)
            rec = self._record("execute", "extended", {**fields, **_malformed(body)})
            self.last_statement = rec["text"]
            self._await(["exec", rec, now, 0, [], watch, cursor_watch])
        elif kind == CLOSE:
            if self._skipping:
                return
            what = body["what"] if not body.get("malformed") else ""
            if what in ("S", "P"):
                table = self.statements if what == "S" else self.portals
                mark = Mark(9)
                op = self._change(table, body["name"], body["name_len"], mark)
                self._wait(["close_s" if what == "S" else "close_p", None, now, 0, [], op])
            else:
                self._wait(["close", None, now, 0, [], 0])  # the server refuses it
        elif kind == FUNCTION_CALL:
            fields = {"function_oid": body.get("oid"), **body["params"], **_malformed(body)}
            rec = self._record("function_call", "simple", fields)
            self.last_statement = f"function call {body.get('oid')}"
            self._await(["fcall", rec, now, 0, []])

    def _evict_portal(self, name: str, portal: Portal | Mark) -> None:
        """A portal's parameters are about to be dropped: record them now."""
        if isinstance(portal, Mark):
            return
        if name.startswith("\x01"):
            name = portal.name  # not yet confirmed: under its Bind's key
        fields = {"statement": portal.statement, "portal": name, **(portal.params or {})}
        portal.bind_id = self._record("bind", "extended", fields)["statement_id"]

    def _change(self, table: Table, name: str, name_len: int,
                entry: Statement | Portal | Mark) -> int:  # fmt: skip
        """A Parse, Bind or Close of ``name`` was sent: ``entry`` is kept under its own key
        until the server confirms it (then it is ``name``'s) or refuses or skips it (then it
        never was), counted in the budget as the rest; ``"\\0"`` and the name keep its
        number, the name's newest change (what a statement sent now will find)."""
        self._ops += 1
        op = self._ops
        entry.name, entry.name_len, entry.segment = name, name_len, self._segment
        table.put(op_key(op), entry)
        table.put("\0" + name, Mark(1 + name_len, op=op))
        return op

    def _current(self, table: Table, name: str) -> tuple[Any, bool, bool]:
        """What ``name`` means for a statement sent now: its entry (None: none, or closed,
        or forgotten), whether the server confirmed it, and whether it is a change sent
        before a Sync not yet answered (the server may refuse it, and run the statement
        with what was there before)."""
        latest = table.get("\0" + name)
        if latest is None:
            return table.get(name), True, False
        change = table.get(op_key(latest.op))
        if change is None:
            return None, False, False
        earlier = change.segment < self._segment
        return (None if isinstance(change, Mark) else change), False, earlier

    def _settle(self, entry: list[Any], ok: bool) -> None:
        """The server confirmed (``ok``), or refused or skipped, the change ``entry``."""
        kind = entry[0]
        if kind in ("parse", "close_s"):
            table = self.statements
        elif kind in ("bind", "close_p"):
            table = self.portals
        else:
            return
        key = op_key(entry[5])
        change = table.get(key)
        if change is None:  # forgotten (the budget): so was its name's entry
            return
        latest = table.get("\0" + change.name)
        if latest is not None and latest.op == entry[5]:
            table.remove("\0" + change.name)
        if not ok:
            table.remove(key)
        elif isinstance(change, Mark):  # a Close
            table.remove(key)
            table.remove(change.name)
        else:
            if isinstance(change, Statement):
                change.epoch = self._epoch
            elif isinstance(change, Portal):
                change.epoch = self._cursor_epoch
            table.adopt(key, change.name)

    def _skip(self, entry: list[Any]) -> None:
        """The server skipped ``entry`` (after an error, up to Sync)."""
        self._settle(entry, False)
        if entry[1] is not None:
            self._result(entry, "not_run")

    def _fail(self, sqlstate: str | None) -> None:
        """The extended-protocol message at the head of ``pending`` failed: the server skips
        what follows up to Sync. The error is the head's result if it has a record (a
        Parse, an Execute) and, as ever, that of the first statement it kept from running."""
        pending = self.pending
        head = pending.popleft()
        charged = False
        if head[0] == "exec":
            self._result(head, "error", sqlstate=sqlstate)
            charged = True
        else:
            self._settle(head, False)
            if head[1] is not None:
                self._result(head, "error", sqlstate=sqlstate)
        while pending and pending[0][0] != "sync":
            entry = pending.popleft()
            if entry[0] in _STATEMENTS and not charged:
                self._result(entry, "error", sqlstate=sqlstate)
                charged = True
            else:
                self._skip(entry)
        self._skipping = not pending

    def _await(self, entry: list[Any]) -> None:
        """A statement waits for the server's answer, unless the server will skip it."""
        if self._skipping:
            self._skip(entry)
        else:
            self._wait(entry)

    def _wait(self, entry: list[Any]) -> None:
        """``entry`` waits for the server's answer, unless ``max_awaiting`` already do:
        then the ``audit_limit`` record, and nothing more is read."""
        if len(self.pending) < self.max_awaiting:
            self.pending.append(entry)
            return
        self.seq += 1
        rec: Record = {"event": "audit_limit", "statement_id": self.seq}
        if self._wall is not None:
            rec["time"] = self._wall()
        rec[CONTEXT_KEY] = self._ctx
        rec.update(limit="awaiting", max_awaiting=self.max_awaiting)
        self._out.append(rec)
        self.limited = True
        raise _Halt

    # -- backend ----------------------------------------------------------------------------

    def _result(self, entry: list[Any], status: str, **fields: Any) -> None:
        rec: Record = entry[1]
        tags: list[str] = entry[4]
        res: Record = {"event": "result", "statement_id": rec["statement_id"]}
        if self._wall is not None:
            res["time"] = self._wall()
        res[CONTEXT_KEY] = self._ctx_short
        res["status"] = status
        if tags:
            res["tag"] = tags[-1]
            res["commands"] = len(tags)
            word = tags[-1].rsplit(" ", 1)[-1]
            if tags[-1].startswith("COPY ") and word.isascii() and word.isdigit():
                res["rows"] = int(word)
        if entry[3]:
            res["copy_data"] = entry[3]
        res.update(fields)
        if entry[0] == "exec" and (
            (entry[5] is not None and entry[5] != self._epoch)
            or (entry[6] is not None and entry[6] != self._cursor_epoch)
        ):
            # SQL PREPARE / DEALLOCATE, or DECLARE / CLOSE CURSOR, ran after the Execute was
            # recorded, before it ran.
            res["text_unconfirmed"] = True
        res["duration_ms"] = round(max(0.0, self._now - entry[2]) * 1000.0, 3)
        self._out.append(res)
        if self._copy_in is entry:
            self._copy_in = None

    def _on_back(self, kind: int, body: dict[str, Any] | None) -> None:
        pending = self.pending
        if kind == COMMAND_COMPLETE and body is not None:
            if body["tag"] in _PREPARE_TAGS:
                self._epoch += 1
            elif body["tag"] in _CURSOR_TAGS:
                self._cursor_epoch += 1
        if not pending:
            return
        head = pending[0]
        what = head[0]
        answers = _ANSWERS.get(kind)
        if answers is not None:
            if what in answers:
                pending.popleft()
                self._settle(head, True)
        elif kind == READY_FOR_QUERY:
            while pending:
                entry = pending.popleft()
                what = entry[0]
                if what == "sync":
                    return
                if what in ("query", "fcall"):
                    sqlstate = entry[5] if len(entry) > 5 else None
                    if sqlstate is not None:
                        self._result(entry, "error", sqlstate=sqlstate)
                    else:
                        self._result(entry, "ok")
                    return
                self._skip(entry)
        elif what == "sync":
            return
        elif kind == ERROR_RESPONSE:
            sqlstate = (body or {}).get("sqlstate")
            if what in ("query", "fcall"):
                if len(head) == 5:
                    head.append(sqlstate)
            else:
                self._fail(sqlstate)
        elif what not in _STATEMENTS:
            return
        elif kind in (COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, PORTAL_SUSPENDED):
            if kind == COMMAND_COMPLETE and body is not None:
                head[4].append(body["tag"])
            if what == "exec":
                pending.popleft()
                self._result(head, "suspended" if kind == PORTAL_SUSPENDED else "ok")
        elif kind in (COPY_IN_RESPONSE, COPY_OUT_RESPONSE, COPY_BOTH_RESPONSE):
            direction = {
                COPY_IN_RESPONSE: "in",
                COPY_OUT_RESPONSE: "out",
                COPY_BOTH_RESPONSE: "both",
            }[kind]
            if kind == COPY_IN_RESPONSE:
                self._copy_in = head
            rec = head[1]
            res: Record = {
                "event": "copy",
                "statement_id": rec["statement_id"],
                "direction": direction,
            }
            if self._wall is not None:
                res["time"] = self._wall()
            res[CONTEXT_KEY] = self._ctx_short
            self._out.append(res)


def context_members(fields: Mapping[str, Any]) -> str:
    """Fields as the members of a JSON object (no braces): a record's context."""
    return json.dumps(dict(fields), separators=(",", ":"), ensure_ascii=False)[1:-1]


def with_context(record: Record) -> Record:
    """``record`` with its context members merged in (what the sink writes)."""
    out = {k: v for k, v in record.items() if k != CONTEXT_KEY}
    ctx = record.get(CONTEXT_KEY)
    if ctx:
        out.update(json.loads("{" + ctx + "}"))
    return out


def _malformed(body: dict[str, Any]) -> dict[str, Any]:
    return {"malformed": True} if body.get("malformed") else {}


def _text_fields(text: Text) -> dict[str, Any]:
    fields: dict[str, Any] = {"text": text.text()}
    if text.truncated:
        fields.update(text_truncated=True, text_bytes=text.size, text_sha256=text.sha256())
    return fields
