"""The console's command language: a tiny tokenizer and parser, pure functions.

    SHOW SESSIONS | SHOW LOCKS | SHOW INSTANCES
    KILL '<conn_id>'
    KILL LOGIN '<login>' [NODE '<node>' | NODE ID '<stable id>']
    LOCK LOGIN '<login>' [NODE '<node>' | NODE ID '<stable id>'] [FOR '<duration>'] REASON '<text>'
    UNLOCK LOGIN '<login>' [NODE '<node>' | NODE ID '<stable id>']

Keywords are case-insensitive; values are single-quoted SQL strings (``''`` for a quote); one
trailing ``;`` is allowed. Drivers' own startup statements (``SET ...``, ``BEGIN``, ``COMMIT``,
``ROLLBACK``, ``DISCARD ALL``, ``RESET ...``) are accepted and do nothing. Anything else is a
:class:`ConsoleSyntaxError`: SQLSTATE 42601 with the 1-based character position of the fault.
"""

from __future__ import annotations

from typing import Final

import attrs

from waypoint.config.units import parse_duration

SYNTAX_ERROR: Final = "42601"
#: Longest value in quotes (a login, node, conn id or reason).
MAX_VALUE: Final = 1024
#: Longest statement the console reads.
MAX_STATEMENT: Final = 16 * 1024


class ConsoleSyntaxError(ValueError):
    """Bad console input; ``position`` is 1-based, in characters, as PostgreSQL reports it."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@attrs.frozen
class Token:
    kind: str  # "word", "string", "number", "punct", "end"
    text: str  # words upper-cased; strings unquoted
    position: int  # 1-based


@attrs.frozen
class Show:
    what: str  # "SESSIONS", "LOCKS", "INSTANCES"


@attrs.frozen
class Kill:
    conn_id: str


@attrs.frozen
class KillLogin:
    login: str
    node: str | None = None
    node_id: str | None = None  # the node's stable id (``NODE ID``), instead of its name


@attrs.frozen
class Lock:
    login: str
    node: str | None
    reason: str
    duration: float | None = None  # seconds; None: until UNLOCK
    node_id: str | None = None  # the node's stable id (``NODE ID``), instead of its name


@attrs.frozen
class Unlock:
    login: str
    node: str | None = None
    node_id: str | None = None


@attrs.frozen
class Noop:
    """A driver's session statement, answered with ``tag`` and nothing done."""

    tag: str


Command = Show | Kill | KillLogin | Lock | Unlock | Noop

#: Commands that change something (``console: admin`` only).
ADMIN_COMMANDS: Final = (Kill, KillLogin, Lock, Unlock)

COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "SESSIONS": (
        "conn_id",
        "instance",
        "listener",
        "login",
        "node",
        "database",
        "role",
        "client_addr",
        "tls",
        "started",
        "state",
        "bytes_in",
        "bytes_out",
        "statement",
        "node_id",
    ),
    "LOCKS": ("login", "node", "reason", "locked_by", "locked_at", "expires", "node_ids"),
    "INSTANCES": ("instance", "started", "sessions", "last_seen"),
}


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if ch == "'":
            start = i
            i += 1
            value: list[str] = []
            while True:
                if i >= n:
                    raise ConsoleSyntaxError("unterminated quoted string", start + 1)
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        value.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                value.append(text[i])
                i += 1
            if len(value) > MAX_VALUE:
                raise ConsoleSyntaxError(
                    f"quoted value longer than {MAX_VALUE} characters", start + 1
                )
            tokens.append(Token("string", "".join(value), start + 1))
            continue
        if ch.isalpha() or ch == "_":
            start = i
            while i < n and (text[i].isalnum() or text[i] in "_$"):
                i += 1
            tokens.append(Token("word", text[start:i].upper(), start + 1))
            continue
        if ch.isdigit() or (ch in "+-." and i + 1 < n and text[i + 1].isdigit()):
            start = i
            i += 1
            while i < n and (text[i].isalnum() or text[i] == "."):
                i += 1
            tokens.append(Token("number", text[start:i], start + 1))
            continue
        # Any other character is a token of its own: the parser names it in its error.
        tokens.append(Token("punct", ch, i + 1))
        i += 1
    tokens.append(Token("end", "", n + 1))
    return tokens


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def error(self, expected: str) -> ConsoleSyntaxError:
        tok = self.tok
        if tok.kind == "end":
            return ConsoleSyntaxError(
                f"syntax error at end of input: expected {expected}", tok.position
            )
        shown = f"'{tok.text}'" if tok.kind == "string" else tok.text
        return ConsoleSyntaxError(
            f'syntax error at or near "{shown}": expected {expected}', tok.position
        )

    def keyword(self, *words: str) -> str | None:
        if self.tok.kind == "word" and self.tok.text in words:
            word = self.tok.text
            self.i += 1
            return word
        return None

    def expect(self, *words: str) -> str:
        word = self.keyword(*words)
        if word is None:
            raise self.error(" or ".join(words))
        return word

    def string(self, what: str) -> str:
        tok = self.tok
        if tok.kind != "string":
            raise self.error(f"a quoted {what}")
        if not tok.text:
            raise ConsoleSyntaxError(f"empty {what}", tok.position)
        self.i += 1
        return tok.text

    def node(self) -> tuple[str | None, str | None]:
        """An optional ``NODE '<name>'`` or ``NODE ID '<stable id>'``: (name, stable id)."""
        if not self.keyword("NODE"):
            return None, None
        if self.keyword("ID"):
            return None, self.string("node id")
        return self.string("node"), None

    def finish(self) -> None:
        if self.tok.kind == "punct" and self.tok.text == ";":
            self.i += 1
        if self.tok.kind != "end":
            raise self.error("end of statement")

    def skip_rest(self) -> None:
        """Every token to the end (of a statement that is accepted whole, such as SET)."""
        while self.tok.kind != "end":
            if self.tok.kind == "punct" and self.tok.text == ";":
                self.i += 1
                if self.tok.kind != "end":
                    raise self.error("end of statement")
                return
            self.i += 1


def parse(text: str) -> Command:
    """One console statement, or :class:`ConsoleSyntaxError`."""
    if len(text) > MAX_STATEMENT:
        raise ConsoleSyntaxError(f"statement longer than {MAX_STATEMENT} characters", MAX_STATEMENT)
    p = _Parser(tokenize(text))
    verb = p.expect(
        "SHOW",
        "KILL",
        "LOCK",
        "UNLOCK",
        "SET",
        "RESET",
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "DISCARD",
    )
    command: Command
    if verb == "SHOW":
        command = Show(p.expect("SESSIONS", "LOCKS", "INSTANCES"))
    elif verb == "KILL":
        if p.keyword("LOGIN"):
            login = p.string("login")
            node, node_id = p.node()
            command = KillLogin(login, node, node_id)
        else:
            command = Kill(p.string("connection id"))
    elif verb == "LOCK":
        p.expect("LOGIN")
        login = p.string("login")
        node, node_id = p.node()
        duration: float | None = None
        if p.keyword("FOR"):
            tok = p.tok
            text_value = p.string("duration")
            try:
                duration = parse_duration(text_value)
            except ValueError as exc:
                raise ConsoleSyntaxError(f"invalid duration: {exc}", tok.position) from None
            if duration <= 0:
                raise ConsoleSyntaxError("the duration must be positive", tok.position)
        p.expect("REASON")
        command = Lock(login, node, p.string("reason"), duration, node_id)
    elif verb == "UNLOCK":
        p.expect("LOGIN")
        login = p.string("login")
        node, node_id = p.node()
        command = Unlock(login, node, node_id)
    elif verb in ("SET", "RESET"):
        if p.tok.kind == "end":
            raise p.error("a parameter")
        p.skip_rest()
        return Noop(verb)
    elif verb in ("BEGIN", "START"):
        if verb == "START":
            p.expect("TRANSACTION")
        p.skip_rest()
        return Noop("BEGIN")
    elif verb in ("COMMIT", "END"):
        p.skip_rest()
        return Noop("COMMIT")
    elif verb in ("ROLLBACK", "ABORT"):
        p.skip_rest()
        return Noop("ROLLBACK")
    else:  # DISCARD
        p.expect("ALL")
        command = Noop("DISCARD ALL")
    p.finish()
    return command


def columns_of(command: Command) -> tuple[str, ...]:
    """The result columns of ``command`` (empty when it returns no rows)."""
    if isinstance(command, Show):
        return COLUMNS[command.what]
    return ()
