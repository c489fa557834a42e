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
:data:`ENTRY_COST` per entry plus its name, kept text and parameter members
(``retained_bytes``). Past the bound, the oldest kept statement texts are replaced by their
SHA-256 and length (an Execute of that statement is recorded with ``text_evicted``, the
length and the hash: its text is in the ``parse`` record with that hash) and the oldest
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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Mapping
from typing import Any, Final, Literal

ParameterMode = Literal["none", "hash", "full"]
#: A record's session context: JSON object members (``"login":"…","node":"…"``), serialized
#: once per session; the sink writes them into the line in place of this key.
CONTEXT_KEY: Final = "_context"
#: The context fields a ``result`` or ``copy`` record carries.
SHORT_CONTEXT: Final = ("instance", "conn_id", "login", "node", "database")
Record = dict[str, Any]

#: What one kept statement or portal counts for beyond its bytes (``retained_bytes``).
ENTRY_COST: Final = 192
#: Statements and Syncs waiting for the server's answer, at most (``awaiting``).
MAX_AWAITING: Final = 65536
#: Cap on names (statement, portal) kept from the wire.
_NAME_CAP: Final = 256
#: Cap on a backend message body kept (CommandComplete, ErrorResponse); the rest is skipped.
_BACKEND_CAP: Final = 4096
_HEADER: Final = struct.Struct("!Bi")
_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")

# Frontend message types.
_Q, _P, _B, _E, _C, _F, _S, _COPYDATA = (
    b"Q"[0],
    b"P"[0],
    b"B"[0],
    b"E"[0],
    b"C"[0],
    b"F"[0],
    b"S"[0],
    b"d"[0],
)
_FRONT_PARSED: Final = frozenset({_Q, _P, _B, _E, _C, _F})
# Backend message types.
_BC, _BE, _BZ, _BI, _BS = b"C"[0], b"E"[0], b"Z"[0], b"I"[0], b"s"[0]
_BG, _BH, _BW = b"G"[0], b"H"[0], b"W"[0]
_BACK_PARSED: Final = frozenset({_BC, _BE, _BG, _BH, _BW})
_D = b"D"[0]
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


class _Text:
    """A field read incrementally: at most ``cap`` bytes kept, the whole hashed when cut
    (or always, with ``always_hash``)."""

    __slots__ = ("cap", "hasher", "kept", "size")

    def __init__(self, cap: int, always_hash: bool = False) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.size = 0
        self.hasher: Any = hashlib.sha256() if always_hash else None

    def add(self, data: bytes | memoryview) -> None:
        n = len(data)
        room = self.cap - len(self.kept)
        if n <= room and self.hasher is None:
            self.kept += data
        else:
            if self.hasher is None:
                self.hasher = hashlib.sha256(self.kept)
            if room > 0:
                self.kept += data[:room]
            self.hasher.update(data)
        self.size += n

    @classmethod
    def whole(cls, data: bytes, cap: int) -> _Text:
        """A field already complete in memory (the common case of a small message)."""
        text = cls(cap)
        text.size = len(data)
        if len(data) <= cap:
            text.kept = bytearray(data)
        else:
            text.kept = bytearray(data[:cap])
            text.hasher = hashlib.sha256(data)
        return text

    @property
    def truncated(self) -> bool:
        return self.size > len(self.kept)

    def sha256(self) -> str:
        h = self.hasher if self.hasher is not None else hashlib.sha256(self.kept)
        return str(h.hexdigest())

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


# A body parser is a generator of requests, answered by :class:`_Body`:
#   ("take", n)         -> bytes: the next n bytes (n is small and bounded)
#   ("cstr", text)      -> None: bytes up to the next NUL go into ``text`` (a _Text)
#   ("blob", n, text)   -> None: the next n bytes go into ``text``
# It returns its result when done; what is left of the body is skipped.
_Request = tuple[Any, ...]
_Parser = Generator[_Request, Any, dict[str, Any]]


class _Short(Exception):
    """The message body ended before its parser did (a malformed message)."""


class _Halt(Exception):
    """Past ``max_awaiting``: the rest of the chunk is not read."""


class _Body:
    """Drives one body parser over the chunks of one message body."""

    __slots__ = ("gen", "need", "remaining", "req", "result", "small")

    def __init__(self, gen: _Parser, length: int) -> None:
        self.gen = gen
        self.remaining = length
        self.small = bytearray()
        self.result: dict[str, Any] | None = None
        self.need = 0
        self.req: _Request | None = None
        self._next(None)

    def _next(self, value: Any) -> None:
        while True:
            try:
                req = self.gen.send(value)
            except StopIteration as stop:
                self.result = stop.value
                self.req = None
                return
            self.req = req
            if req[0] == "take":
                if req[1] <= 0:
                    value = b""
                    continue
                self.need = req[1]
                self.small = bytearray()
            elif req[0] == "blob":
                if req[1] <= 0:
                    value = None
                    continue
                self.need = req[1]
            return

    def feed(self, data: memoryview) -> None:
        """Feed body bytes (never more than ``remaining``)."""
        self.remaining -= len(data)
        pos, n = 0, len(data)
        while pos < n and self.req is not None:
            kind = self.req[0]
            if kind == "take":
                take = min(self.need - len(self.small), n - pos)
                self.small += data[pos : pos + take]
                pos += take
                if len(self.small) == self.need:
                    self._next(bytes(self.small))
            elif kind == "cstr":
                text: _Text = self.req[1]
                rest = bytes(data[pos:])
                end = rest.find(b"\0")
                if end < 0:
                    text.add(rest)
                    pos = n
                else:
                    text.add(rest[:end])
                    pos += end + 1
                    self._next(None)
            else:  # blob
                text = self.req[2]
                take = min(self.need, n - pos)
                text.add(data[pos : pos + take])
                pos += take
                self.need -= take
                if self.need == 0:
                    self._next(None)

    def finish(self) -> dict[str, Any]:
        """The body is complete: the parser's result (partial if the body was short)."""
        if self.result is not None:
            return self.result
        try:
            self.gen.throw(_Short())
        except StopIteration as stop:
            return dict(stop.value or {}, malformed=True)
        except _Short:
            pass
        return {"malformed": True}


class _Statement:
    """A prepared statement kept: its text (or, evicted, only its SHA-256 and length).

    Sent but not yet confirmed by the server, it is kept under its Parse's key (see
    :meth:`AuditTracker._op_key`) with its own ``name``, counted in its cost."""

    __slots__ = ("epoch", "kept", "key_len", "name", "name_len", "segment", "sha", "size",
                 "truncated")  # fmt: skip

    def __init__(self, key_len: int, text: _Text) -> None:
        self.key_len = key_len
        self.kept: bytes | None = bytes(text.kept)
        self.truncated = text.truncated
        self.sha: str | None = text.sha256() if self.truncated else None
        self.size = text.size
        self.name = ""
        self.name_len = 0
        #: Pending: the Sync segment it was sent in; confirmed: SQL PREPAREs seen before.
        self.segment = 0
        self.epoch = 0

    def cost(self) -> int:
        kept = len(self.kept) if self.kept is not None else 0
        return ENTRY_COST + self.key_len + self.name_len + kept

    def evict(self) -> None:
        if self.kept is not None and self.sha is None:
            self.sha = hashlib.sha256(self.kept).hexdigest()
        self.kept = None


class _Portal:
    """A portal kept: its statement's name and parameter members (evicted: dropped)."""

    __slots__ = ("bind_id", "epoch", "key_len", "name", "name_len", "params", "params_len",
                 "segment", "statement", "statement_len")  # fmt: skip

    def __init__(self, key_len: int, statement: str, statement_len: int,
                 params: dict[str, Any]) -> None:  # fmt: skip
        self.key_len = key_len
        #: Confirmed: the cursor command tags seen by then (see ``_cursor_epoch``).
        self.epoch = 0
        #: Sent but not yet confirmed (kept under its Bind's key): the portal's name.
        self.name = ""
        self.name_len = 0
        self.segment = 0
        self.statement = statement
        self.statement_len = statement_len
        self.params: dict[str, Any] | None = params
        #: Evicted: the ``bind`` record that has the parameters.
        self.bind_id = 0
        # The parameter members as the C tracker keeps them (encoded).
        self.params_len = len(_dumps(params).encode()) - 2 if params else 0

    def cost(self) -> int:
        return ENTRY_COST + self.key_len + self.name_len + self.statement_len + self.params_len

    def evict(self) -> None:
        self.params = None
        self.params_len = 0


class _Mark:
    """A table entry with no content: a Close sent but not yet confirmed (under its key,
    ``name`` what it closes), or a name's newest unconfirmed Parse, Bind or Close (under
    ``"\\0"`` and the name: ``op``, its number)."""

    __slots__ = ("key_len", "name", "name_len", "op", "segment")

    def __init__(self, key_len: int, name: str = "", name_len: int = 0, op: int = 0,
                 segment: int = 0) -> None:  # fmt: skip
        self.key_len = key_len
        self.name = name
        self.name_len = name_len
        self.op = op
        self.segment = segment

    def cost(self) -> int:
        return ENTRY_COST + self.key_len + self.name_len

    def evict(self) -> None:
        pass


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class _Table:
    """Named entries of one session within ``budget`` (``retained``: their cost): past it,
    the oldest kept entries are evicted (made smaller), then the oldest evicted ones
    dropped (``dropped`` counts them)."""

    __slots__ = ("budget", "dropped", "entries", "evicted", "kept", "on_evict", "pin", "retained")

    def __init__(
        self,
        budget: int,
        *,
        pin: str | None = None,
        on_evict: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.budget = budget
        #: A name whose entry is neither counted nor evicted (the unnamed portal).
        self.pin = pin
        #: Called with an entry about to be evicted.
        self.on_evict = on_evict
        self.entries: dict[str, Any] = {}
        #: Names in the order their entries will be evicted, then dropped.
        self.kept: OrderedDict[str, None] = OrderedDict()
        self.evicted: OrderedDict[str, None] = OrderedDict()
        self.retained = 0
        self.dropped = 0

    def get(self, name: str) -> Any:
        return self.entries.get(name)

    def remove(self, name: str) -> None:
        entry = self.entries.pop(name, None)
        if entry is not None and name != self.pin:
            self.retained -= entry.cost()
            self.kept.pop(name, None)
            self.evicted.pop(name, None)

    def put(self, name: str, entry: _Statement | _Portal | _Mark) -> None:
        """Keep ``entry`` under ``name`` (the newest), then shrink to the budget."""
        self.remove(name)
        self.entries[name] = entry
        if name == self.pin:
            return
        self.kept[name] = None
        self.retained += entry.cost()
        self._shrink()

    def adopt(self, key: str, name: str) -> None:
        """The unconfirmed entry under ``key`` becomes ``name``'s (the newest): the server
        confirmed it."""
        entry = self.entries[key]
        evicted = key in self.evicted
        self.remove(key)
        self.remove(name)
        entry.key_len, entry.name, entry.name_len = entry.name_len, "", 0
        self.entries[name] = entry
        if name == self.pin:
            return
        (self.evicted if evicted else self.kept)[name] = None
        self.retained += entry.cost()
        self._shrink()

    def _shrink(self) -> None:
        while self.retained > self.budget and self.kept:
            old, _ = self.kept.popitem(last=False)
            victim = self.entries[old]
            self.retained -= victim.cost()
            if self.on_evict is not None:
                self.on_evict(old, victim)
            victim.evict()
            self.retained += victim.cost()
            self.evicted[old] = None
        while self.retained > self.budget and self.evicted:
            old, _ = self.evicted.popitem(last=False)
            victim = self.entries.pop(old)
            self.retained -= victim.cost()
            self.dropped += 1
            # An unconfirmed change forgotten (or which is a name's newest): what the name
            # had before is forgotten too, as it may be stale.
            if old.startswith("\0"):
                self.remove(old[1:])
            elif old.startswith("\x01"):
                self.remove(victim.name)


def _op_key(op: int) -> str:
    """The key of the change numbered ``op`` until the server confirms or refuses it (no
    name from the wire starts with NUL or 0x01; its cost counts 9 bytes, as in C)."""
    return f"\x01{op}"


def _i16(b: bytes) -> int:
    return int(_I16.unpack(b)[0])


def _i32(b: bytes) -> int:
    return int(_I32.unpack(b)[0])


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
        self.statements = _Table(max_session_statement_bytes)
        self.portals = _Table(max_session_statement_bytes, pin="", on_evict=self._evict_portal)
        #: What the server answers next, in order: [kind, record-or-None, started].
        self.pending: deque[list[Any]] = deque()
        self.seq = 0
        #: The text of the current or last statement run (what a console shows).
        self.last_statement: str | None = None
        self._front = _Framer(
            _FRONT_PARSED, self._front_parser, self._on_front, _front_fast(self.cap)
        )
        self._back = _Framer(_BACK_PARSED, _back_parser, self._on_back, _back_fast)
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

    def _front_parser(self, kind: int) -> _Parser:
        if kind == _Q:
            return _parse_query(self.cap)
        if kind == _P:
            return _parse_parse(self.cap)
        if kind == _B:
            return _parse_bind(self.cap, self.parameters)
        if kind == _E:
            return _parse_execute()
        if kind == _C:
            return _parse_close()
        return _parse_function_call(self.cap, self.parameters)

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
        if kind == _COPYDATA:
            if self._copy_in is not None:
                self._copy_in[3] += 1
            return
        if kind == _S:
            self._skipping = False
            self._segment += 1
            self._wait(["sync", None, now, 0])
            return
        if kind == _D:
            if not self._skipping:
                self._wait(["describe", None, now, 0, []])
            return
        if body is None:
            return
        if kind == _Q:
            rec = self._record("query", "simple", _text_fields(body["text"]))
            rec.update(_malformed(body))
            self.last_statement = rec["text"]
            self._await(["query", rec, now, 0, []])
        elif kind == _P:
            name = body["name"]
            text: _Text = body["text"]
            fields = _text_fields(text)
            rec = self._record(
                "parse", "extended", {"statement": name, **fields, **_malformed(body)}
            )
            entry = ["parse", rec, now, 0, []]
            if self._skipping:
                self._result(entry, "not_run")
            else:
                op = self._change(self.statements, name, body["name_len"], _Statement(9, text))
                self._wait([*entry, op])
        elif kind == _B:
            if not self._skipping:
                portal_ = _Portal(9, body["statement"], body["statement_len"], body["params"])
                op = self._change(self.portals, body["portal"], body["portal_len"], portal_)
                self._wait(["bind", None, now, 0, [], op])
        elif kind == _E:
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
        elif kind == _C:
            if self._skipping:
                return
            what = body["what"] if not body.get("malformed") else ""
            if what in ("S", "P"):
                table = self.statements if what == "S" else self.portals
                mark = _Mark(9)
                op = self._change(table, body["name"], body["name_len"], mark)
                self._wait(["close_s" if what == "S" else "close_p", None, now, 0, [], op])
            else:
                self._wait(["close", None, now, 0, [], 0])  # the server refuses it
        elif kind == _F:
            fields = {"function_oid": body.get("oid"), **body["params"], **_malformed(body)}
            rec = self._record("function_call", "simple", fields)
            self.last_statement = f"function call {body.get('oid')}"
            self._await(["fcall", rec, now, 0, []])

    def _evict_portal(self, name: str, portal: _Portal | _Mark) -> None:
        """A portal's parameters are about to be dropped: record them now."""
        if isinstance(portal, _Mark):
            return
        if name.startswith("\x01"):
            name = portal.name  # not yet confirmed: under its Bind's key
        fields = {"statement": portal.statement, "portal": name, **(portal.params or {})}
        portal.bind_id = self._record("bind", "extended", fields)["statement_id"]

    def _change(self, table: _Table, name: str, name_len: int,
                entry: _Statement | _Portal | _Mark) -> int:  # fmt: skip
        """A Parse, Bind or Close of ``name`` was sent: ``entry`` is kept under its own key
        until the server confirms it (then it is ``name``'s) or refuses or skips it (then it
        never was), counted in the budget as the rest; ``"\\0"`` and the name keep its
        number, the name's newest change (what a statement sent now will find)."""
        self._ops += 1
        op = self._ops
        entry.name, entry.name_len, entry.segment = name, name_len, self._segment
        table.put(_op_key(op), entry)
        table.put("\0" + name, _Mark(1 + name_len, op=op))
        return op

    def _current(self, table: _Table, name: str) -> tuple[Any, bool, bool]:
        """What ``name`` means for a statement sent now: its entry (None: none, or closed,
        or forgotten), whether the server confirmed it, and whether it is a change sent
        before a Sync not yet answered (the server may refuse it, and run the statement
        with what was there before)."""
        latest = table.get("\0" + name)
        if latest is None:
            return table.get(name), True, False
        change = table.get(_op_key(latest.op))
        if change is None:
            return None, False, False
        earlier = change.segment < self._segment
        return (None if isinstance(change, _Mark) else change), False, earlier

    def _settle(self, entry: list[Any], ok: bool) -> None:
        """The server confirmed (``ok``), or refused or skipped, the change ``entry``."""
        kind = entry[0]
        if kind in ("parse", "close_s"):
            table = self.statements
        elif kind in ("bind", "close_p"):
            table = self.portals
        else:
            return
        key = _op_key(entry[5])
        change = table.get(key)
        if change is None:  # forgotten (the budget): so was its name's entry
            return
        latest = table.get("\0" + change.name)
        if latest is not None and latest.op == entry[5]:
            table.remove("\0" + change.name)
        if not ok:
            table.remove(key)
        elif isinstance(change, _Mark):  # a Close
            table.remove(key)
            table.remove(change.name)
        else:
            if isinstance(change, _Statement):
                change.epoch = self._epoch
            elif isinstance(change, _Portal):
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
        if kind == _BC and body is not None:
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
        elif kind == _BZ:
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
        elif kind == _BE:
            sqlstate = (body or {}).get("sqlstate")
            if what in ("query", "fcall"):
                if len(head) == 5:
                    head.append(sqlstate)
            else:
                self._fail(sqlstate)
        elif what not in _STATEMENTS:
            return
        elif kind in (_BC, _BI, _BS):
            if kind == _BC and body is not None:
                head[4].append(body["tag"])
            if what == "exec":
                pending.popleft()
                self._result(head, "suspended" if kind == _BS else "ok")
        elif kind in (_BG, _BH, _BW):
            direction = {_BG: "in", _BH: "out", _BW: "both"}[kind]
            if kind == _BG:
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


def _text_fields(text: _Text) -> dict[str, Any]:
    fields: dict[str, Any] = {"text": text.text()}
    if text.truncated:
        fields.update(text_truncated=True, text_bytes=text.size, text_sha256=text.sha256())
    return fields


# -- body parsers -------------------------------------------------------------------------


def _parse_query(cap: int) -> _Parser:
    text = _Text(cap)
    try:
        yield ("cstr", text)
    except _Short:
        return {"text": text, "malformed": True}
    return {"text": text}


def _parse_parse(cap: int) -> _Parser:
    name = _Text(_NAME_CAP)
    text = _Text(cap)
    out: dict[str, Any] = {"text": text}
    try:
        yield ("cstr", name)
        yield ("cstr", text)
    except _Short:
        out["malformed"] = True
    return dict(out, name=name.text(), name_len=len(name.kept))


def _param_value(data: _Text, binary: bool, mode: ParameterMode) -> Any:
    if mode == "hash":
        return data.sha256()
    value: dict[str, Any]
    raw = bytes(data.kept)
    if not binary:
        try:
            value = {"text": raw.decode("utf-8")}
        except UnicodeDecodeError:
            value = {"hex": raw.hex()}
    else:
        value = {"hex": raw.hex()}
    if data.truncated:
        value.update(truncated=True, bytes=data.size, sha256=data.sha256())
    return value


def _params(
    count: int, formats: list[int], mode: ParameterMode, cap: int
) -> Generator[_Request, Any, dict[str, Any]]:
    values: list[Any] = []
    # What all the parameters of one message keep, together: ``cap`` (32767 parameters of
    # ``cap`` bytes each would otherwise be held at once); past it they are hashed, cut.
    left = cap
    for i in range(count):
        length = _i32((yield ("take", 4)))
        if length < 0:
            values.append(None)
            continue
        # One format code applies to all; else each its own (none given: text).
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        binary = fmt == 1
        if mode == "none":
            yield ("blob", length, _NullText())
            continue
        data = _Text(left, always_hash=mode == "hash")
        if length:
            yield ("blob", length, data)
        left -= len(data.kept)
        values.append(_param_value(data, binary, mode))
    fields: dict[str, Any] = {"parameter_count": count}
    if mode != "none":
        fields["parameters"] = values
    return fields


class _NullText(_Text):
    """Discards what it is given (parameters with ``parameters = "none"``)."""

    def __init__(self) -> None:
        super().__init__(0)

    def add(self, data: bytes | memoryview) -> None:
        self.size += len(data)


def _parse_bind(cap: int, mode: ParameterMode) -> _Parser:
    portal = _Text(_NAME_CAP)
    stmt = _Text(_NAME_CAP)
    params: dict[str, Any] = {}
    try:
        yield ("cstr", portal)
        yield ("cstr", stmt)
        nfmt = _i16((yield ("take", 2)))
        formats = (
            [_i16(b) for b in _chunks((yield ("take", 2 * max(0, nfmt))), 2)] if nfmt > 0 else []
        )
        count = _i16((yield ("take", 2)))
        params = yield from _params(max(0, count), formats, mode, cap)
    except _Short:
        return dict(_bind_names(portal, stmt), params=params, malformed=True)
    return dict(_bind_names(portal, stmt), params=params)


def _bind_names(portal: _Text, stmt: _Text) -> dict[str, Any]:
    return {
        "portal": portal.text(),
        "portal_len": len(portal.kept),
        "statement": stmt.text(),
        "statement_len": len(stmt.kept),
    }


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _parse_execute() -> _Parser:
    portal = _Text(_NAME_CAP)
    try:
        yield ("cstr", portal)
    except _Short:
        return {"portal": portal.text(), "malformed": True}
    return {"portal": portal.text()}


def _parse_close() -> _Parser:
    name = _Text(_NAME_CAP)
    try:
        what = (yield ("take", 1)).decode("latin-1")
        yield ("cstr", name)
    except _Short:
        return {"what": "", "name": "", "name_len": 0, "malformed": True}
    return {"what": what, "name": name.text(), "name_len": len(name.kept)}


def _parse_function_call(cap: int, mode: ParameterMode) -> _Parser:
    out: dict[str, Any] = {"params": {}}
    try:
        out["oid"] = _i32((yield ("take", 4)))
        nfmt = _i16((yield ("take", 2)))
        formats = (
            [_i16(b) for b in _chunks((yield ("take", 2 * max(0, nfmt))), 2)] if nfmt > 0 else []
        )
        count = _i16((yield ("take", 2)))
        out["params"] = yield from _params(max(0, count), formats, mode, cap)
    except _Short:
        out["malformed"] = True
    return out


def _back_parser(kind: int) -> _Parser:
    if kind == _BC:
        return _parse_tag()
    if kind == _BE:
        return _parse_error()
    return _parse_nothing()


def _parse_nothing() -> _Parser:
    return {}
    yield ("take", 0)  # pragma: no cover - makes this a generator


def _parse_tag() -> _Parser:
    tag = _Text(_BACKEND_CAP)
    with contextlib.suppress(_Short):
        yield ("cstr", tag)
    return {"tag": tag.text()}


def _parse_error() -> _Parser:
    sqlstate: str | None = None
    with contextlib.suppress(_Short):
        while True:
            code = yield ("take", 1)
            if code in (b"\0", b""):
                break
            value = _Text(_BACKEND_CAP)
            yield ("cstr", value)
            if code == b"C":
                sqlstate = value.text()
    return {"sqlstate": sqlstate}


def _front_fast(cap: int) -> Callable[[int, bytes], dict[str, Any] | None]:
    def fast(kind: int, body: bytes) -> dict[str, Any] | None:
        # Only when the first NUL ends the field where the streaming parser would.
        if kind == _Q and body and body.find(b"\0") == len(body) - 1:
            return {"text": _Text.whole(body[:-1], cap)}
        if kind == _E:
            nul = body.find(b"\0")
            if nul >= 0 and len(body) - nul == 5:
                return {"portal": body[:nul][:_NAME_CAP].decode("utf-8", "replace")}
        return None

    return fast


def _back_fast(kind: int, body: bytes) -> dict[str, Any] | None:
    if kind == _BC and body and body.find(b"\0") == len(body) - 1 and len(body) <= _BACKEND_CAP:
        return {"tag": body[:-1].decode("utf-8", "replace")}
    return None


class _Framer:
    """Splits one direction into messages: bodies of ``parsed`` types go through their
    parser (bounded memory), the others are skipped; ``on_message(type, result)``."""

    __slots__ = ("body", "fast", "header", "kind", "make", "on_message", "parsed", "skip")

    def __init__(
        self,
        parsed: frozenset[int],
        make: Callable[[int], _Parser],
        on_message: Callable[[int, dict[str, Any] | None], None],
        fast: Callable[[int, bytes], dict[str, Any] | None] | None = None,
    ) -> None:
        #: For a whole body in one chunk: the result without a body parser, or None
        #: (then the parser runs).
        self.fast = fast
        self.parsed = parsed
        self.make = make
        self.on_message = on_message
        self.header = bytearray()
        self.skip = 0  # body bytes of the current skipped message still to come
        self.body: _Body | None = None
        self.kind = 0

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        n = len(view)
        pos = 0
        while pos < n:
            body = self.body
            if body is not None:
                take = min(body.remaining, n - pos)
                body.feed(view[pos : pos + take])
                pos += take
                if body.remaining == 0:
                    self.body = None
                    self.on_message(self.kind, body.finish())
                continue
            if self.skip:
                take = min(self.skip, n - pos)
                self.skip -= take
                pos += take
                continue
            if not self.header and n - pos >= 5:
                kind, length = _HEADER.unpack_from(view, pos)
                pos += 5
                size = length - 4 if length > 4 else 0
                if pos + size <= n:  # the whole message is in this chunk
                    if kind not in self.parsed:
                        self.on_message(kind, None)
                        pos += size
                        continue
                    fast = self.fast
                    if fast is not None:
                        result = fast(kind, chunk[pos : pos + size])
                        if result is not None:
                            self.kind = kind
                            self.on_message(kind, result)
                            pos += size
                            continue
                self._start(kind, size)
                continue
            else:
                take = min(5 - len(self.header), n - pos)
                self.header += view[pos : pos + take]
                pos += take
                if len(self.header) < 5:
                    return
                kind, length = _HEADER.unpack(self.header)
                self.header.clear()
            self._start(kind, max(0, length - 4))

    def _start(self, kind: int, size: int) -> None:
        self.kind = kind
        if kind in self.parsed:
            body = _Body(self.make(kind), size)
            if size == 0:
                self.on_message(kind, body.finish())
            else:
                self.body = body
        else:
            self.on_message(kind, None)
            self.skip = size
