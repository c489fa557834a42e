"""The audit tracker's tables of one session's names, sans I/O: prepared statements
(:class:`Statement`) and portals (:class:`Portal`), each table within a byte budget
(:class:`Table`: past it the oldest entries are evicted, then forgotten). A Parse, Bind or
Close sent and not yet confirmed is kept too, under a key of its own (:func:`op_key`), with a
:class:`Mark` of each name's newest."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from .messages import Text

#: What one kept statement or portal counts for beyond its bytes
#: (``AuditTracker.retained_bytes``).
ENTRY_COST: Final = 192


class Statement:
    """A prepared statement kept: its text (or, evicted, only its SHA-256 and length).

    Sent but not yet confirmed by the server, it is kept under its Parse's key (see
    :func:`op_key`) with its own ``name``, counted in its cost."""

    __slots__ = ("epoch", "kept", "key_len", "name", "name_len", "segment", "sha", "size",
                 "truncated")  # fmt: skip

    def __init__(self, key_len: int, text: Text) -> None:
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


class Portal:
    """A portal kept: its statement's name and parameter members (evicted: dropped)."""

    __slots__ = ("bind_id", "epoch", "key_len", "name", "name_len", "params", "params_len",
                 "segment", "statement", "statement_len")  # fmt: skip

    def __init__(self, key_len: int, statement: str, statement_len: int,
                 params: dict[str, Any]) -> None:  # fmt: skip
        self.key_len = key_len
        #: Confirmed: the cursor command tags seen by then (see ``AuditTracker._cursor_epoch``).
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


class Mark:
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


class Table:
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

    def put(self, name: str, entry: Statement | Portal | Mark) -> None:
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


def op_key(op: int) -> str:
    """The key of the change numbered ``op`` until the server confirms or refuses it (no
    name from the wire starts with NUL or 0x01; its cost counts 9 bytes, as in C)."""
    return f"\x01{op}"
