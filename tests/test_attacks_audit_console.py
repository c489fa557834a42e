"""Attacks on the statement audit and the console, as a caller with the weakest grant
(``readonly``), a console caller with ``"console": "read"``, or a hostile client speaking
the protocol by hand; real PostgreSQL 15 and 18 behind Waypoint where a backend is involved.

Each test states the attack and what must hold. Attacks the product does not stop yet are
``xfail(strict=True)`` with the reason: they fail today and must start passing with the fix.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_support import E2EEnv, RawSession, create_app_database, e2e_env
from pgcluster import PgCluster
from test_e2e_audit import wait_for

from waypoint.audit.chain import search, verify
from waypoint.audit.sink import GENESIS, line_hash
from waypoint.cli.main import main
from waypoint.observability.metrics import Metrics
from waypoint.observability.metrics_server import serve_metrics

LOGIN = "mallory@example.com"
NODE = "mallory-laptop"
#: What the attacker wants to read, and what it wants the audit to say it ran instead.
SECRET_QUERY = "select v from t /* the-real-read */"
DECOY_QUERY = "select 'harmless' /* decoy */"


# -- the protocol, by hand --------------------------------------------------------------------


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def parse(name: str, sql: str) -> bytes:
    return _msg(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))


def bind(portal: str, statement: str) -> bytes:
    return _msg(
        b"B",
        portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0),
    )


def execute(portal: str = "") -> bytes:
    return _msg(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


def close_statement(name: str) -> bytes:
    return _msg(b"C", b"S" + name.encode() + b"\0")


def query(sql: str) -> bytes:
    return _msg(b"Q", sql.encode() + b"\0")


SYNC = _msg(b"S", b"")


def read_until_ready(raw: RawSession) -> list[tuple[bytes, bytes]]:
    """Every message up to and including the next ReadyForQuery."""
    raw.sock.settimeout(20)
    out = []
    while True:
        kind, payload = raw.read_message()
        out.append((kind, payload))
        if kind == b"Z":
            return out


def data_rows(messages: Sequence[tuple[bytes, bytes]]) -> list[str]:
    """The first column of every DataRow, as text."""
    rows = []
    for kind, payload in messages:
        if kind == b"D":
            (n,) = struct.unpack("!i", payload[2:6])
            rows.append(payload[6 : 6 + n].decode())
    return rows


def sqlstates(messages: Sequence[tuple[bytes, bytes]]) -> list[str]:
    out = []
    for kind, payload in messages:
        if kind == b"E":
            for field in payload.split(b"\0"):
                if field[:1] == b"C":
                    out.append(field[1:].decode())
    return out


# -- the audited deployment -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def readonly_env(pg: PgCluster, tmp_path: Path) -> AsyncIterator[tuple[E2EEnv, str, Path]]:
    """Waypoint with the audit on and a fresh database the attacker (127.0.0.1) may only
    read: (env, database, audit file)."""
    db = create_app_database(pg)
    path = tmp_path / "audit.jsonl"
    audit = f'[audit]\nenabled = true\nsink = "file"\nfile = "{path}"\nparameters = "hash"\n'
    async with e2e_env(pg, tmp_path, tables_extra=audit) as env:
        env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login=LOGIN, node=NODE)
        yield env, db, path


def _executes_with_results(
    recs: list[dict[str, Any]],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    results = {r["statement_id"]: r for r in recs if r["event"] == "result"}
    return [
        (r, results[r["statement_id"]])
        for r in recs
        if r["event"] == "execute" and r["statement_id"] in results
    ]


async def _run_and_read_audit(
    env: E2EEnv, db: str, path: Path, steps: Sequence[bytes]
) -> tuple[list[list[tuple[bytes, bytes]]], list[dict[str, Any]]]:
    """Send each step (ending in Sync or a Query) and read its answer; then the audit of
    the session once its last execute has a result."""

    def work() -> list[list[tuple[bytes, bytes]]]:
        raw = RawSession.open(env, db)
        try:
            answers = []
            for step in steps:
                raw.sock.sendall(step)
                answers.append(read_until_ready(raw))
            return answers
        finally:
            raw.sock.close()

    answers = await trio.to_thread.run_sync(work)
    last_exec_id = None

    def done(recs: list[dict[str, Any]]) -> bool:
        nonlocal last_exec_id
        execs = [r for r in recs if r["event"] == "execute"]
        if not execs:
            return False
        last_exec_id = execs[-1]["statement_id"]
        return any(r["event"] == "result" and r["statement_id"] == last_exec_id for r in recs)

    recs = await wait_for(path, done, "the last execute's result")
    assert verify([str(path)]).problem is None
    return answers, recs


def _the_secret_ran_recorded_as(
    answers: list[list[tuple[bytes, bytes]]], recs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The server ran the secret read (its row came back); the execute record of it."""
    assert data_rows(answers[-1]) == ["one"], answers[-1]
    (execute_rec, result), *_ = reversed(_executes_with_results(recs))
    assert result["status"] == "ok" and result["tag"] == "SELECT 1"
    assert execute_rec["login"] == LOGIN and execute_rec["node"] == NODE
    return execute_rec


# -- audit: the text of an Execute ------------------------------------------------------------

PLPGSQL_PREPARE_GAP = (
    "a known gap: PREPARE run from PL/pgSQL shows no command tag, so the trackers cannot "
    "tell that a name now means another text (the DO block that did it is recorded in full)"
)
_HIDDEN = SECRET_QUERY.encode().hex()

#: (steps, the SQLSTATEs of the middle step): the decoy's text is recorded for a name or
#: portal, the server is made to keep (or get) the real read under it, then runs it.
DECOY_ATTACKS = [
    pytest.param(
        [
            parse("s", SECRET_QUERY) + SYNC,
            parse("s", DECOY_QUERY) + SYNC,  # refused: the name exists; the server keeps it
            bind("", "s") + execute() + SYNC,
        ],
        ["42P05"],
        id="reparse_refused",
    ),
    pytest.param(
        [
            parse("s", SECRET_QUERY) + SYNC,
            # An error, then Close and Parse, which the server skips up to the Sync.
            bind("", "no_such_statement") + close_statement("s") + parse("s", DECOY_QUERY) + SYNC,
            bind("", "s") + execute() + SYNC,
        ],
        ["26000"],
        id="reparse_skipped_after_an_error",
    ),
    pytest.param(
        [
            parse("s", DECOY_QUERY) + SYNC,
            query(f"deallocate s; prepare s as {SECRET_QUERY}"),
            bind("", "s") + execute() + SYNC,
        ],
        [],
        id="sql_prepare",
    ),
    pytest.param(
        [
            parse("s", DECOY_QUERY) + SYNC,
            # No PREPARE command tag, and nothing in the text to match.
            query(
                "do $$ begin execute 'deallocate s'; execute 'prepare s as ' || "
                f"convert_from(decode('{_HIDDEN}', 'hex'), 'UTF8'); end $$"
            ),
            bind("", "s") + execute() + SYNC,
        ],
        [],
        id="prepare_in_plpgsql",
        marks=pytest.mark.xfail(strict=True, reason=PLPGSQL_PREPARE_GAP),
    ),
    pytest.param(
        [
            parse("", DECOY_QUERY) + SYNC,
            query(f"declare c cursor with hold for {SECRET_QUERY}"),  # a portal no Bind made
            execute("c") + SYNC,
        ],
        [],
        id="sql_cursor",
    ),
]


@pytest.mark.parametrize(("steps", "middle"), DECOY_ATTACKS)
async def test_an_execute_record_never_claims_a_decoy_ran(
    pg: PgCluster, tmp_path: Path, steps: list[bytes], middle: list[str]
) -> None:
    """A caller with the weakest grant records a harmless text under a prepared statement's
    name (or as the unnamed statement), makes the server keep or put the real read under the
    name it executes, and executes it: the server returns the real read's row, and the
    execute record must not claim the decoy ran: it carries the text that ran, or none, or
    says its text is not confirmed (``text_unconfirmed``)."""
    with trio.fail_after(120):
        async with readonly_env(pg, tmp_path) as (env, db, path):
            answers, recs = await _run_and_read_audit(env, db, path, steps)
    assert sqlstates(answers[1]) == middle
    record = _the_secret_ran_recorded_as(answers, recs)
    assert record["text"] != DECOY_QUERY or record.get("text_unconfirmed") is True, record


# -- audit: statements pipelined behind the startup packet ------------------------------------


def _metric(env: E2EEnv, name: str) -> float:
    return sum(
        sample.value
        for family in env.running.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    )


def _startup(db: str) -> bytes:
    body = struct.pack("!i", 3 << 16)
    for k, v in (("user", "raw"), ("database", db)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _pipelined_after_startup(env: E2EEnv, db: str, after: bytes) -> list[tuple[bytes, bytes]]:
    """Send the startup packet and ``after`` in one write (they reach Waypoint together,
    before it has logged in to the backend); every message back until the connection
    closes or a ReadyForQuery follows the statements."""
    sock = socket.create_connection((env.host, env.port), timeout=20)
    raw = RawSession(sock)
    try:
        sock.sendall(_startup(db) + after)
        out: list[tuple[bytes, bytes]] = []
        ready = 0
        while True:
            try:
                kind, payload = raw.read_message()
            except (AssertionError, OSError):
                return out  # closed
            out.append((kind, payload))
            if kind == b"Z":
                ready += 1
                if ready == 2:  # the login's, then the statement's
                    return out
    finally:
        sock.close()


async def test_a_statement_pipelined_with_the_startup_never_runs_unrecorded_when_the_sink_fails(
    pg: PgCluster, tmp_path: Path
) -> None:
    """With ``on_error = "close"`` and a sink that fails every write (/dev/full), a
    statement sent in the same packet as the startup (it waits in the handshake's buffer
    and is relayed first) must not run: the session ends with 58030 and the table is
    unchanged."""
    db = create_app_database(pg)
    audit = '[audit]\nenabled = true\nsink = "file"\nfile = "/dev/full"\non_error = "close"\n'
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path, tables_extra=audit) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readwrite"]}}, login=LOGIN, node=NODE)
            # A first session's statement makes the sink fail (and stay failed).
            first = await trio.to_thread.run_sync(
                _pipelined_after_startup, env, db, query("select 1 /* fails the sink */")
            )
            assert first and any(kind == b"Z" for kind, _ in first), first
            with trio.fail_after(20):
                while _metric(env, "waypoint_audit_sink_errors_total") < 1:
                    await trio.sleep(0.02)
            answer = await trio.to_thread.run_sync(
                _pipelined_after_startup,
                env,
                db,
                query("insert into t values (2, 'ran unrecorded')"),
            )
            assert "58030" in sqlstates(answer), answer
            rows = pg.execute("select count(*) from t where id = 2", dbname=db)
            assert rows[0][0] == 0, "the pipelined INSERT ran though it could not be recorded"
            await env.assert_clean()


# -- audit: results paired with the wrong statement -------------------------------------------


def _results_of_queries(n: int) -> Any:
    """A predicate: the first ``n`` query records of the file have their results."""

    def done(recs: list[dict[str, Any]]) -> bool:
        ids = [r["statement_id"] for r in recs if r["event"] == "query"][:n]
        have = {r["statement_id"] for r in recs if r["event"] == "result"}
        return len(ids) == n and all(i in have for i in ids)

    return done


@pytest.mark.parametrize(
    "failing",
    [
        pytest.param(parse("", "select from where"), id="parse_error"),
        pytest.param(parse("", "select 1/0") + bind("", "") + execute(), id="execute_error"),
    ],
)
async def test_a_query_the_server_ignores_does_not_shift_results_onto_other_statements(
    pg: PgCluster, tmp_path: Path, failing: bytes
) -> None:
    """An extended-protocol error, then a simple Query before the Sync (ignored by the
    server); then the real read, then a statement that fails. The audit must record the
    real read as run (ok, SELECT 1), not with the next statement's error, and the ignored
    Query as not run."""
    with trio.fail_after(120):
        async with readonly_env(pg, tmp_path) as (env, db, path):

            def work() -> list[list[tuple[bytes, bytes]]]:
                raw = RawSession.open(env, db)
                try:
                    answers = []
                    for step in (
                        failing + query("select 'ignored' /* ignored */") + SYNC,
                        query(SECRET_QUERY),
                        query("select 1/0 /* cover */"),
                    ):
                        raw.sock.sendall(step)
                        answers.append(read_until_ready(raw))
                    return answers
                finally:
                    raw.sock.close()

            answers = await trio.to_thread.run_sync(work)
            assert data_rows(answers[1]) == ["one"]
            recs = await wait_for(path, _results_of_queries(2), "results of the first two queries")
    by_text = {r["text"]: r for r in recs if r["event"] == "query"}
    results = {r["statement_id"]: r for r in recs if r["event"] == "result"}
    secret = results[by_text[SECRET_QUERY]["statement_id"]]
    assert (secret["status"], secret.get("tag")) == ("ok", "SELECT 1"), secret
    ignored = results[by_text["select 'ignored' /* ignored */"]["statement_id"]]
    assert ignored["status"] in ("not_run", "error"), ignored


# -- audit: forging or hiding records in the file ---------------------------------------------

#: Texts a client sends hoping to end its record's line and start a forged one (another
#: login's record), or to break the line for a reader: newlines, JSON, quotes and
#: backslashes, the Unicode line separators, a NUL cut short, control bytes.
FORGING_TEXTS = [
    'select 1 /* "}\n{"seq":99,"prev":"x","login":"victim@example.com","text":"forged"} */',
    'select 1 /* \\"} ,"login":"victim@example.com" \\u000a */',
    'select 1 /* \u2028{"login":"victim@example.com"}\u2029 */',
    "select 1 /* \r\n\x0b\x0c\x1b[2K */",
]


async def test_statement_texts_cannot_forge_or_split_audit_lines(
    pg: PgCluster, tmp_path: Path
) -> None:
    """Each hostile text (simple Query, and Parse/Bind/Execute), plus a Query whose bytes
    are not UTF-8: one line per record, each a JSON object with the attacker's identity,
    nothing attributed to the victim, the text recorded as sent, the chain intact."""
    with trio.fail_after(120):
        async with readonly_env(pg, tmp_path) as (env, db, path):
            steps = [query(text) for text in FORGING_TEXTS]
            steps += [parse("", text) + bind("", "") + execute() + SYNC for text in FORGING_TEXTS]
            steps.append(_msg(b"Q", b"select '\xff\xfe\xc0\x80' /* not utf-8 */\0"))
            answers, recs = await _run_and_read_audit(env, db, path, steps)
            want = 2 * len(FORGING_TEXTS) + 1  # statements, each with its result
            recs = await wait_for(
                path,
                lambda rs: sum(1 for r in rs if r["event"] == "result") >= want,
                "every result",
            )
    assert sqlstates(answers[-1]) == ["22021"]  # the server refused the bytes; recorded anyway
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(recs)
    assert all(isinstance(r, dict) and r["login"] == LOGIN and r["node"] == NODE for r in recs)
    texts = [r["text"] for r in recs if r["event"] in ("query", "parse")]
    assert texts[: len(FORGING_TEXTS)] == FORGING_TEXTS
    assert texts[len(FORGING_TEXTS) : 2 * len(FORGING_TEXTS)] == FORGING_TEXTS
    assert texts[-1] == "select '\ufffd\ufffd\ufffd\ufffd' /* not utf-8 */"
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert list(search([str(path)], login="victim@example.com")) == []
    assert verify([str(path)]).problem is None


# -- `waypoint audit verify` on a tampered file -----------------------------------------------


def _chained_lines(n: int) -> list[bytes]:
    """``n`` records chained as the sink chains them."""
    lines, prev = [], GENESIS
    for seq in range(1, n + 1):
        line = json.dumps(
            {"seq": seq, "prev": prev, "event": "query", "text": f"select {seq}"},
            separators=(",", ":"),
        ).encode()
        lines.append(line)
        prev = line_hash(line)
    return lines


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(b'{"seq":1e999,"prev":"x"}', id="seq_out_of_range"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested_past_recursion"),
    ],
)
def test_verify_and_search_answer_any_line_without_a_traceback(
    tmp_path: Path, hostile: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone who can write the audit file adds a line no JSON reader expects: verify
    names it as the first broken link (exit 1), search goes on past it; neither raises."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"\n".join([*_chained_lines(3), hostile]) + b"\n")
    report = verify([str(path)])
    assert report.records == 3 and report.problem is not None and report.problem.line == 4
    assert main(["audit", "verify", str(path)]) == 1
    assert f"{path}:4:" in capsys.readouterr().err
    assert [r["seq"] for r in search([str(path)])][:3] == [1, 2, 3]
    assert main(["audit", "search", "--since", "2020-01-01", str(path)]) == 0


def test_verify_finds_rotated_files_swapped(tmp_path: Path) -> None:
    """The chain split over three files, the two rotated ones' contents exchanged (names
    kept): verify, given the files oldest first, names the first broken link."""
    lines = _chained_lines(9)
    files = [tmp_path / name for name in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl")]
    for i, f in enumerate(files):
        f.write_bytes(b"".join(line + b"\n" for line in lines[3 * i : 3 * i + 3]))
    names = [str(f) for f in files]
    assert verify(names).problem is None and verify(names).records == 9
    older, newer = files[0].read_bytes(), files[1].read_bytes()
    files[0].write_bytes(newer)
    files[1].write_bytes(older)
    problem = verify(names).problem
    assert problem is not None and (problem.file, problem.line) == (names[1], 1)


# -- the console: a "read" caller trying to change something ----------------------------------

VICTIM_IP = "127.0.0.2"
VICTIM = "victim@example.com"
_KILL = f"KILL LOGIN '{VICTIM}'"
_LOCK = f"LOCK LOGIN '{VICTIM}' REASON 'gotcha'"
#: Admin commands dressed up: case, whitespace and comments, a Unicode letter whose upper
#: case is ASCII (dotless i, long s), behind a driver's no-op statement, behind a SHOW;
#: each as a simple Query, then through Parse/Bind/Execute (named and unnamed).
READ_ONLY_ATTEMPTS = [
    query(_KILL.lower()),
    query(f"\t-- a comment\n  KiLl\n  LOGIN\n'{VICTIM}' ;"),
    query(f"K\u0131LL LOGIN '{VICTIM}'"),
    query(f"\u017fet x = 1; {_LOCK}"),
    query(f"BEGIN; {_KILL}"),
    query(f"SHOW LOCKS; {_LOCK}"),
    parse("", _LOCK) + bind("", "") + execute() + SYNC,
    parse("s", f"UNLOCK LOGIN '{VICTIM}'") + bind("p", "s") + execute("p") + SYNC,
    parse("k", _KILL) + SYNC,  # parsed (described), never executed
]


async def test_a_read_console_caller_changes_nothing_by_any_route(
    pg: PgCluster, tmp_path: Path
) -> None:
    """Every attempt is refused (42501 for a command that parses, 42601 otherwise) or, parsed
    and never executed, does nothing; the victim's session lives on, no lock is set, and the
    console connection keeps serving SHOW."""
    db = create_app_database(pg)
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path) as env:
            env.grant(
                "127.0.0.1",
                rules=[{"backends": {"pg-main": {"console": "read"}}}],
                login=LOGIN,
                node=NODE,
            )
            env.grant(VICTIM_IP, {db: {"permissions": ["readonly"]}}, login=VICTIM, node="box")
            victim = await env.pg8000_connect(db, source=VICTIM_IP)

            def attack() -> tuple[list[list[str]], list[bytes]]:
                raw = RawSession.open(env, "waypoint")
                try:
                    out = []
                    for step in READ_ONLY_ATTEMPTS:
                        raw.sock.sendall(step)
                        out.append(sqlstates(read_until_ready(raw)))
                    raw.sock.sendall(query("SHOW LOCKS"))
                    locks = read_until_ready(raw)
                    out.append(sqlstates(locks))
                    return out, [kind for kind, _ in locks]
                finally:
                    raw.sock.close()

            got, locks = await trio.to_thread.run_sync(attack)
            assert b"D" not in locks and b"C" in locks, locks  # no lock was set
            assert got == [
                ["42501"],
                ["42501"],
                ["42501"],
                ["42601"],
                ["42601"],
                ["42601"],
                ["42501"],
                ["42501"],
                [],
                [],
            ], got
            assert await trio.to_thread.run_sync(victim.run, "select 1") == [[1]]
            victim.close()


# -- metrics and health: an unauthenticated caller holding connections ------------------------


async def test_idle_connections_to_the_metrics_listener_are_bounded() -> None:
    """Anyone who reaches the metrics listener opens connections and sends nothing: past
    ``max_connections`` each new one is closed at once (the process keeps its descriptors
    for its database listeners); those within the bound wait for their request, and once
    they are gone a scrape is answered."""
    cap, extra = 8, 12
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(
                serve_metrics, "127.0.0.1", 0, Metrics(), max_connections=cap, request_timeout=600
            )
        )
        idle = []
        for _ in range(cap):
            idle.append(await trio.open_tcp_stream(*address))
        # The first ``cap`` are being served (each waits for its request) before more come.
        with trio.fail_after(20):
            while not _serving_all(address, cap):
                await trio.sleep(0.01)
        refused = [await trio.open_tcp_stream(*address) for _ in range(extra)]
        with trio.fail_after(20):
            for stream in refused:
                with contextlib.suppress(trio.BrokenResourceError):  # a reset: closed too
                    assert await stream.receive_some(1) == b""
        assert all(_open_and_quiet(stream) for stream in idle)
        for stream in [*idle, *refused]:
            await stream.aclose()
        with trio.fail_after(20):
            while True:
                stream = await trio.open_tcp_stream(*address)
                await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = await stream.receive_some(65536)
                await stream.aclose()
                if answer.startswith(b"HTTP/1.1 200"):
                    break
                await trio.sleep(0.01)  # the idle ones' handlers are still ending
        nursery.cancel_scope.cancel()


def _open_and_quiet(stream: trio.SocketStream) -> bool:
    """Nothing to read and not closed by the peer, looked at without waiting."""
    with socket.socket(fileno=os.dup(stream.socket.fileno())) as dup:
        try:
            dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
    return False


def _serving_all(address: tuple[str, int], n: int) -> bool:
    """``n`` connections to ``address`` are established on the server's side (its accepted
    sockets, seen in /proc/net/tcp: local port ``address[1]``, state ESTABLISHED)."""
    port = f"{address[1]:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[1].endswith(":" + port) and r[3] == "01") >= n
