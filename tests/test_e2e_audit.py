"""Statement audit end to end on PostgreSQL 15 and 18: psql (libpq, simple protocol),
psycopg 3 (extended protocol, prepared statements, pipeline mode, COPY, errors, a
cancelled statement, a 1 MiB statement) and pgjdbc (server-prepared statements, a batch, an
error, simple mode), the records' identity fields, and the hash chain."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import trio
from console_support import admin_rule, pgjdbc_jar, psycopg_rows
from e2e_support import E2EEnv, RawSession, create_app_database, e2e_env
from pgcluster import PgCluster

from waypoint.audit.chain import verify

LOGIN = "carol@example.com"
# The markers come first: only the first max_statement_bytes of the text are kept.
BIG_SIMPLE = "/* big-simple */ select length('" + "x" * (1 << 20) + "')"
BIG_EXTENDED = "/* big-ext */ select length(%s) + length('" + "x" * (1 << 20) + "')"


def audit_section(path: Path, parameters: str = "hash", max_statement_bytes: int = 4096) -> str:
    return (
        f'[audit]\nenabled = true\nsink = "file"\nfile = "{path}"\n'
        f'parameters = "{parameters}"\nmax_statement_bytes = {max_statement_bytes}\n'
    )


@contextlib.asynccontextmanager
async def audited_env(
    pg: PgCluster, tmp_path: Path, *, node: str, tags: list[str], extra: str = ""
) -> AsyncIterator[tuple[E2EEnv, str, Path]]:
    """Waypoint with the audit on (``audit_section``), a fresh database the test's client
    (127.0.0.1, ``LOGIN`` on ``node``) may read and write: (env, database, audit file)."""
    db = create_app_database(pg)
    path = tmp_path / "audit.jsonl"
    async with e2e_env(pg, tmp_path, tables_extra=audit_section(path) + extra) as env:
        env.grant(
            "127.0.0.1", {db: {"permissions": ["readwrite"]}}, login=LOGIN, node=node, tags=tags
        )
        yield env, db, path


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def wait_for(path: Path, pred: Any, what: str, bound: float = 20.0) -> list[dict[str, Any]]:
    """Poll the audit file (bounded) until ``pred(records)`` holds."""
    with trio.move_on_after(bound):
        while True:
            recs = records(path)
            if pred(recs):
                return recs
            await trio.sleep(0.05)
    raise AssertionError(f"audit file never showed {what}: {records(path)[-10:]}")


def results_by_id(recs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Results keyed by (conn_id, statement_id) folded into the statement id of one session."""
    return {r["statement_id"]: r for r in recs if r["event"] == "result"}


def _psycopg_work(dsn: str) -> int:
    """Prepared statements, a pipeline, COPY, an error; returns the backend pid."""
    with psycopg.connect(dsn, connect_timeout=20, autocommit=True) as conn:
        for i in range(5):
            conn.execute(
                "select v from t where id = %s::int /* prepared */", (str(i),), prepare=True
            )
        with conn.pipeline():
            conn.execute("select %s::int /* pipe-a */", (1,))
            conn.execute("select %s::text /* pipe-b */", ("b",))
            conn.execute("select 3 /* pipe-c */")
        with conn.cursor() as cur, cur.copy("copy t (id, v) from stdin") as copy:
            for i in range(100, 103):
                copy.write_row((i, f"row{i}"))
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0 /* div */")
        conn.execute(BIG_SIMPLE)  # no parameters: psycopg sends a simple Query
        conn.execute(BIG_EXTENDED, ("y",))
        pid = conn.info.backend_pid
    return pid


def _cancelled(env: E2EEnv, dsn: str) -> str:
    with psycopg.connect(dsn, connect_timeout=20, autocommit=True) as conn:
        pid = conn.info.backend_pid
        marker = "cancel-me-audit"
        done = threading.Event()

        def cancel_when_running() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not done.is_set():
                rows = env.cluster.execute(
                    "SELECT state, query FROM pg_stat_activity WHERE pid = :p", p=pid
                )
                if rows and rows[0][0] == "active" and marker in str(rows[0][1]):
                    conn.cancel_safe(timeout=10)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=cancel_when_running)
        t.start()
        try:
            conn.execute(f"select pg_sleep(30) /* {marker} */")
        except psycopg.errors.QueryCanceled as exc:
            state = exc.sqlstate or ""
        else:  # pragma: no cover - the assertion reports it
            state = "not cancelled"
        finally:
            done.set()
            t.join(30)
        return state


def _many_prepared(dsn: str) -> list[int]:
    """One prepared statement, four more (past a 1KiB session budget), the first again."""
    with psycopg.connect(dsn, connect_timeout=20, autocommit=True) as conn:
        out = []
        for i in [0, 1, 2, 3, 4, 0]:
            row = conn.execute(f"select {i} /* evict-{i} */", prepare=True).fetchone()
            assert row is not None
            out.append(int(row[0]))
    return out


async def test_an_evicted_prepared_statement_still_runs_recorded(
    pg: PgCluster, tmp_path: Path
) -> None:
    """max_session_statement_bytes small: the oldest prepared statement's text is evicted,
    and running it again is recorded with the SHA-256 of the text its parse record has
    (the budget counts each Parse and Bind awaiting the server's confirmation, too)."""
    extra = "max_session_statement_bytes = 1280\n"
    with trio.fail_after(120):
        async with audited_env(pg, tmp_path, node="laptop", tags=[], extra=extra) as (
            env,
            db,
            path,
        ):
            got = await trio.to_thread.run_sync(_many_prepared, env.dsn(db))
            assert got == [0, 1, 2, 3, 4, 0]
            recs = await wait_for(
                path,
                lambda rs: sum(1 for x in rs if x["event"] == "execute") >= 6,
                "six executes",
            )
    parse = next(x for x in recs if x["event"] == "parse" and "evict-0" in x["text"])
    execs = [x for x in recs if x["event"] == "execute" and x["statement"] == parse["statement"]]
    first, again = execs[0], execs[-1]
    assert first["text"] == parse["text"] and "text_evicted" not in first
    assert again["text"] is None and again["text_evicted"] is True
    assert again["text_sha256"] == hashlib.sha256(parse["text"].encode()).hexdigest()
    assert again["text_bytes"] == len(parse["text"].encode())
    result = next(
        x for x in recs if x["event"] == "result" and x["statement_id"] == again["statement_id"]
    )
    assert result["status"] == "ok" and result["tag"] == "SELECT 1"
    assert verify([str(path)]).problem is None


async def test_statements_of_every_kind_are_recorded_with_who_ran_them(
    pg: PgCluster, tmp_path: Path
) -> None:
    with trio.fail_after(180):
        async with audited_env(pg, tmp_path, node="laptop", tags=["tag:dev"]) as (env, db, path):
            # psql: simple protocol, and an error
            r = await env.psql("select v from t where id = 1 /* psql-ok */", db)
            assert r.returncode == 0, r.stderr
            r = await env.psql("select 1/0 /* psql-div */", db)
            assert r.returncode != 0
            recs = await wait_for(
                path,
                lambda rs: sum(1 for x in rs if x["event"] == "result") >= 2,
                "psql results",
            )
            q = {x["text"]: x for x in recs if x["event"] == "query"}
            ok = q["select v from t where id = 1 /* psql-ok */"]
            assert ok["protocol"] == "simple" and ok["login"] == LOGIN and ok["node"] == "laptop"
            assert ok["tags"] == ["tag:dev"] and ok["database"] == db
            assert ok["role"].startswith("wp_pg_main_carol_example_com")
            assert ok["listener"] == "pg-main" and ok["client"].startswith("127.0.0.1:")
            assert ok["node_id"] and ok["instance"] and ok["conn_id"] and ok["time"]
            res = {(x["conn_id"], x["statement_id"]): x for x in recs if x["event"] == "result"}
            assert res[(ok["conn_id"], ok["statement_id"])]["tag"] == "SELECT 1"
            div = q["select 1/0 /* psql-div */"]
            assert res[(div["conn_id"], div["statement_id"])]["sqlstate"] == "22012"

            # psycopg: extended protocol
            dsn = env.dsn(db)
            await trio.to_thread.run_sync(_psycopg_work, dsn)
            recs = await wait_for(
                path,
                lambda rs: any(
                    x["event"] == "execute" and "/* big-ext */" in (x.get("text") or "")
                    for x in rs
                ),
                "the big statement's execute (its parse is recorded before it)",
            )
            recs = await wait_for(
                path,
                lambda rs: (
                    len([x for x in rs if x["event"] == "result"])
                    >= len([x for x in rs if x["event"] in ("query", "execute", "function_call")])
                ),
                "every result",
            )
            res = {(x["conn_id"], x["statement_id"]): x for x in recs if x["event"] == "result"}
            execs = [x for x in recs if x["event"] == "execute"]
            prepared = [x for x in execs if "/* prepared */" in x["text"]]
            assert len(prepared) == 5
            assert len({x["statement"] for x in prepared}) == 1 and prepared[0]["statement"]
            assert all(
                x["text"] == "select v from t where id = $1::int /* prepared */" for x in prepared
            )
            assert all(
                x["parameter_count"] == 1 and len(x["parameters"][0]) == 64 for x in prepared
            )
            assert prepared[1]["parameters"][0] == hashlib.sha256(b"1").hexdigest()
            parses = [x for x in recs if x["event"] == "parse" and "/* prepared */" in x["text"]]
            assert len(parses) == 1  # parsed once, executed five times: each recorded
            for tag in ("pipe-a", "pipe-b", "pipe-c"):
                (e,) = [x for x in execs if f"/* {tag} */" in x["text"]]
                assert e["protocol"] == "extended"
                assert res[(e["conn_id"], e["statement_id"])]["status"] == "ok"
            (copy_stmt,) = [x for x in recs if x.get("text") == "copy t (id, v) from stdin"]
            copy_res = res[(copy_stmt["conn_id"], copy_stmt["statement_id"])]
            assert copy_res["rows"] == 3 and copy_res["tag"] == "COPY 3"
            assert any(
                x["event"] == "copy"
                and x["statement_id"] == copy_stmt["statement_id"]
                and x["conn_id"] == copy_stmt["conn_id"]
                and x["direction"] == "in"
                for x in recs
            )
            stmts = [x for x in recs if x["event"] in ("query", "execute")]
            (d,) = [x for x in stmts if "/* div */" in x["text"]]
            assert res[(d["conn_id"], d["statement_id"])]["sqlstate"] == "22012"
            # The 1 MiB statements: recorded, cut, with the hash of the whole text.
            (big_q,) = [x for x in stmts if "/* big-simple */" in x["text"]]
            assert big_q["event"] == "query" and big_q["text_truncated"] is True
            assert big_q["text"] == BIG_SIMPLE[:4096] and big_q["text_bytes"] == len(BIG_SIMPLE)
            assert big_q["text_sha256"] == hashlib.sha256(BIG_SIMPLE.encode()).hexdigest()
            assert res[(big_q["conn_id"], big_q["statement_id"])]["tag"] == "SELECT 1"
            sent = BIG_EXTENDED.replace("%s", "$1")
            (big_parse,) = [
                x for x in recs if x["event"] == "parse" and "/* big-ext */" in x["text"]
            ]
            assert big_parse["text"] == sent[:4096] and big_parse["text_bytes"] == len(sent)
            assert big_parse["text_sha256"] == hashlib.sha256(sent.encode()).hexdigest()
            (big_exec,) = [x for x in execs if "/* big-ext */" in x["text"]]
            assert (
                big_exec["text_truncated"] and big_exec["text_sha256"] == big_parse["text_sha256"]
            )
            assert big_exec["parameters"] == [hashlib.sha256(b"y").hexdigest()]
            assert res[(big_exec["conn_id"], big_exec["statement_id"])]["tag"] == "SELECT 1"

            # A cancelled statement: 57014 on its result.
            state = await trio.to_thread.run_sync(_cancelled, env, dsn)
            assert state == "57014"
            recs = await wait_for(
                path, lambda rs: any(x.get("sqlstate") == "57014" for x in rs), "the cancel"
            )
            (sleep,) = [
                x
                for x in recs
                if "cancel-me-audit" in (x.get("text") or "") and x["event"] in ("query", "execute")
            ]
            assert res_of(recs, sleep)["sqlstate"] == "57014"

            await env.assert_clean()
    # Every record chained, whatever the sessions.
    report = verify([str(path)])
    assert report.problem is None and report.records == len(records(path))
    assert "x" * 5000 not in path.read_text()


JDBC_PROGRAM = Path(__file__).parent / "java" / "AuditWork.java"


def _pgjdbc_work(host: str, port: int, db: str) -> list[str]:
    java = shutil.which("java")
    assert java is not None, "pgjdbc needs java on PATH"
    url = f"jdbc:postgresql://{host}:{port}/{db}?user=anyone&sslmode=disable&connectTimeout=20&prepareThreshold=3"
    r = subprocess.run(
        [java, "-cp", pgjdbc_jar(), str(JDBC_PROGRAM), url],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


async def test_pgjdbc_statements_are_recorded_with_who_ran_them(
    pg: PgCluster, tmp_path: Path
) -> None:
    """pgjdbc: a plain statement (extended protocol, unnamed), a prepared statement run six
    times (server-prepared after prepareThreshold: Parse once under a name, then Bind and
    Execute only), a batch, an error and a simple-protocol statement; every execution is
    recorded with its text and the identity, every result paired."""
    with trio.fail_after(180):
        async with audited_env(pg, tmp_path, node="jdbc-box", tags=["tag:jdbc"]) as (env, db, path):
            out = await trio.to_thread.run_sync(_pgjdbc_work, env.host, env.port, db)
            assert out == [
                "OK plain",
                "OK prepared",
                "OK batch 3",
                "ERROR 22012",
                "OK simple",
                "DONE",
            ], out
            recs = await wait_for(
                path,
                lambda rs: (
                    any(
                        x["event"] in ("query", "execute")
                        and "/* jdbc-simple */" in (x.get("text") or "")
                        for x in rs
                    )
                    and len([x for x in rs if x["event"] == "result"])
                    >= len([x for x in rs if x["event"] in ("query", "execute")])
                ),
                "the pgjdbc statements and their results",
            )
            await env.assert_clean()
    stmts = [x for x in recs if x["event"] in ("query", "execute", "parse")]
    for x in stmts:
        assert x["login"] == LOGIN and x["node"] == "jdbc-box" and x["tags"] == ["tag:jdbc"]
        assert x["database"] == db and x["node_id"] and x["conn_id"] and x["time"]
    execs = [x for x in recs if x["event"] == "execute"]
    prepared = [x for x in execs if "/* jdbc-prepared */" in (x["text"] or "")]
    assert len(prepared) == 6
    assert all(x["text"] == "select v from t where id = $1 /* jdbc-prepared */" for x in prepared)
    assert all(x["parameter_count"] == 1 for x in prepared)
    # Server-prepared from the threshold on: later executions run a named statement that
    # was parsed once, and still carry its text.
    named = {x["statement"] for x in prepared if x["statement"]}
    assert len(named) == 1, prepared
    parses = [x for x in recs if x["event"] == "parse" and x["statement"] in named]
    assert len(parses) == 1
    assert sum(1 for x in prepared if x["statement"] in named) >= 3
    batch = [x for x in execs if "/* jdbc-batch */" in (x["text"] or "")]
    assert len(batch) == 3 and all(x["parameter_count"] == 2 for x in batch)
    assert [res_of(recs, x)["tag"] for x in batch] == ["INSERT 0 1"] * 3
    (div,) = [x for x in execs if "/* jdbc-div */" in (x["text"] or "")]
    assert res_of(recs, div)["status"] == "error" and res_of(recs, div)["sqlstate"] == "22012"
    (plain,) = [x for x in execs if "/* jdbc-plain */" in (x["text"] or "")]
    assert plain["protocol"] == "extended" and res_of(recs, plain)["tag"] == "SELECT 1"
    (simple,) = [x for x in recs if x["event"] == "query" and "/* jdbc-simple */" in x["text"]]
    assert simple["protocol"] == "simple" and res_of(recs, simple)["tag"] == "SELECT 1"
    report = verify([str(path)])
    assert report.problem is None and report.records == len(records(path))


async def test_show_sessions_shows_the_statement_a_session_last_ran(
    pg: PgCluster, tmp_path: Path
) -> None:
    """With the audit on, the console's SHOW SESSIONS carries each session's current or
    last statement (taken from its tracker as the engine queues its records)."""
    db = create_app_database(pg)
    path = tmp_path / "audit.jsonl"
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path, tables_extra=audit_section(path)) as env:
            env.grant("127.0.0.1", rules=[admin_rule()], login="admin@example.com")
            env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}}, login=LOGIN)
            raw = await trio.to_thread.run_sync(
                lambda: RawSession.open(env, db, source="127.0.0.2")
            )
            try:
                for marker in ("first", "second"):
                    sql = f"select v from t /* shown-{marker} */"
                    assert await trio.to_thread.run_sync(raw.read_result_of, sql) == "ok:one"
                    with trio.fail_after(15):
                        while True:
                            cols, rows = await psycopg_rows(env.host, env.port, "SHOW SESSIONS")
                            at = cols.index("statement")
                            (row,) = [r for r in rows if r[cols.index("login")] == LOGIN]
                            if row[at] == sql:
                                break
                            await trio.sleep(0.05)
            finally:
                raw.close()


def res_of(recs: list[dict[str, Any]], stmt: dict[str, Any]) -> dict[str, Any]:
    (r,) = [
        x
        for x in recs
        if x["event"] == "result"
        and x["conn_id"] == stmt["conn_id"]
        and x["statement_id"] == stmt["statement_id"]
    ]
    return r


def _metric(env: E2EEnv, name: str) -> float:
    total = 0.0
    for family in env.running.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def _after_failure(conn: psycopg.Connection[Any]) -> str:
    try:
        conn.execute("select 2 /* must not run unrecorded */")
    except psycopg.OperationalError as exc:
        return f"{exc.sqlstate}: {exc}"
    return "not closed"


async def test_a_failing_sink_with_on_error_close_ends_the_session(
    pg: PgCluster, tmp_path: Path
) -> None:
    """The audit file is /dev/full: every write fails (ENOSPC). With ``on_error = "close"``
    the session ends with a FATAL that says why, and the metrics count it."""
    db = create_app_database(pg)
    section = audit_section(Path("/dev/full")) + 'on_error = "close"\n'
    with trio.fail_after(120):
        async with e2e_env(pg, tmp_path, tables_extra=section) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login=LOGIN)
            conn = await trio.to_thread.run_sync(
                lambda: psycopg.connect(env.dsn(db), connect_timeout=20, autocommit=True)
            )
            try:
                # Recorded (queued) before the sink is known to fail: it runs.
                await trio.to_thread.run_sync(conn.execute, "select 1 /* before the failure */")
                with trio.fail_after(20):
                    while _metric(env, "waypoint_audit_sink_errors_total") < 1:
                        await trio.sleep(0.02)
                outcome = await trio.to_thread.run_sync(_after_failure, conn)
            finally:
                await trio.to_thread.run_sync(conn.close)
            assert outcome.startswith("58030: ") and "audit" in outcome, outcome
            assert _metric(env, "waypoint_audit_sessions_closed_total") >= 1
            assert _metric(env, "waypoint_audit_records_total") == 0
            # The statement that could not be recorded never ran.
            rows = pg.execute(
                "select count(*) from pg_stat_activity where query like :q and datname = :d",
                q="%must not run unrecorded%",
                d=db,
            )
            assert rows[0][0] == 0
            await env.assert_clean()
