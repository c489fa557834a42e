"""Logs (docs/observability.md): JSON lines with stable keys, every value a named field (the
provisioning engine's role, database and listener too), library records rendered as events,
the 58000 correlation id findable in the log, and no password or role secret in any line."""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from e2e_support import (
    StaticPeer,
    create_app_database,
    db_rule,
    make_static_config_text,
    run_waypoint,
)
from log_support import configured_log, parse_lines
from pgcluster import PgCluster
from test_metrics import LISTENER, connect, query, refused_sqlstate

from waypoint.config.load import load_config_text
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.observability.log import STABLE_KEYS, Format, get_logger
from waypoint.provision.engine import Credentials, Provisioner

PACKAGE = Path(__file__).resolve().parent.parent / "waypoint"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Waypoint's log tree as JSON lines into a buffer; the loggers are restored afterwards."""
    with configured_log("json") as buffer:
        yield buffer


# Valid raw SQL that fails when it runs: provisioning fails with 58000.
BROKEN_GRANT = {
    "permissions": ["readonly"],
    "sql": ["GRANT SELECT ON public.no_such_table TO {{.Role}}"],
}


def config_text(cluster: PgCluster, db: str) -> str:
    return make_static_config_text(
        cluster,
        [
            StaticPeer(
                "127.0.0.1/32",
                "alice@example.com",
                "alice-laptop",
                [db_rule({db: {"permissions": ["readwrite"]}})],
            ),
            StaticPeer(
                "127.0.0.2/32", "bob@example.com", "bob-laptop", [db_rule({db: BROKEN_GRANT})]
            ),
        ],
        tables_extra="[provisioning]\nallow_raw_sql = true",
    )


@pytest.fixture
def role_secrets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every plaintext role secret the provisioner hands out while the test runs."""
    collected: list[str] = []
    original = Provisioner.credentials

    @contextlib.asynccontextmanager
    async def spy(
        self: Provisioner, identity: Identity, grant: EffectiveGrant, *, rotate: bool = False
    ) -> AsyncIterator[Credentials]:
        async with original(self, identity, grant, rotate=rotate) as creds:
            collected.append(creds.secret)
            yield creds

    monkeypatch.setattr(Provisioner, "credentials", spy)
    return collected


@pytest.mark.pg
async def test_json_log_lines_have_stable_keys_and_never_a_secret(
    pg15: PgCluster, json_log: io.StringIO, role_secrets: list[str]
) -> None:
    db = create_app_database(pg15)
    config = load_config_text(config_text(pg15, db), source="logs.toml")
    async with run_waypoint(config) as running:
        conn = await connect(running, db)
        await query(conn, "INSERT INTO t VALUES (2, 'two')")
        conn.close()
        conn = await connect(running, db)  # cached secret: no provision
        await query(conn, "SELECT 1")
        conn.close()
        conn = await connect(
            running, db, startup_params={"options": "-c waypoint.presets=readonly"}
        )
        await query(conn, "SELECT 1")
        conn.close()
        assert (await refused_sqlstate(running, db, source="127.0.0.9"))[0] == "28000"
        sqlstate, message = await refused_sqlstate(running, db, source="127.0.0.2")
    assert sqlstate == "58000", message

    records = parse_lines(json_log)
    for record in records:
        assert list(record)[: len(STABLE_KEYS)] == list(STABLE_KEYS), record
        assert record["level"] in {"debug", "info", "warning", "error"}

    ends = [r for r in records if r["event"] == "connection_end"]
    assert len(ends) == 5
    ok = [r for r in ends if r["outcome"] != "refused" and r["sqlstate"] is None]
    assert len(ok) == 3, ends
    for r in ok:
        assert r["conn_id"] and r["listener"] == LISTENER
        assert (r["login"], r["node"], r["db"]) == ("alice@example.com", "alice-laptop", db)
        assert r["role"].startswith("wp_pg_main_alice_example_com_alice_laptop_")
        assert r["bytes_in"] > 0 and r["bytes_out"] > 0
        assert r["duration_ms"] >= 0
    assert len({r["role"] for r in ok}) == 2  # her role, and her readonly-preset role
    refused = {r["sqlstate"] for r in ends if r["outcome"] == "refused"}
    assert refused == {"28000", "58000"}

    # The provisioning engine's lines are events whose role, database and listener are keys.
    created = [r for r in records if r["event"] == "role_created"]
    assert {r["role"] for r in created} == {r["role"] for r in ok}, created
    for r in created:
        assert (r["listener"], r["db"]) == (LISTENER, db), r
        assert "message" not in r
    granted = [r for r in records if r["event"] == "role_grants_changed"]
    assert {r["role"] for r in granted} == {r["role"] for r in ok}, granted
    assert all(isinstance(r["granted"], list) and r["granted"] for r in granted), granted

    # The correlation id the client was shown is in the log.
    cid = message.rsplit("correlation id ", 1)[1].rstrip(")")
    assert len(cid) >= 8
    with_cid = [r for r in records if cid in json.dumps(r)]
    assert any(r["event"] == "connection_end" and r["sqlstate"] == "58000" for r in with_cid)
    (admin_error,) = [r for r in records if r["event"] == "provision_admin_error"]
    assert admin_error["correlation_id"] == cid and admin_error["error_sqlstate"] == "42P01"

    # No password and no role secret in any line.
    text = json_log.getvalue()
    assert len(role_secrets) >= 2  # alice's role and her readonly-preset role
    for secret in [pg15.admin_password, pg15.superuser_password, *role_secrets]:
        assert secret not in text


def test_library_records_are_library_log_events_with_logger_and_message(
    json_log: io.StringIO,
) -> None:
    logging.getLogger("redis.sentinel").info("below the libraries' level: %s", "dropped")
    logging.getLogger("redis.sentinel").warning("master %s is down", "mymaster")
    (record,) = parse_lines(json_log)
    assert record["event"] == "library_log" and record["level"] == "warning"
    assert record["logger"] == "redis.sentinel"
    assert record["message"] == "master mymaster is down"
    assert record["conn_id"] is None


def test_library_record_with_bad_format_args_still_formats_as_json(json_log: io.StringIO) -> None:
    (handler,) = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is json_log
    ]
    bad = logging.LogRecord("pg8000", logging.WARNING, __file__, 1, "role %s and %s", ("x",), None)
    record = json.loads(handler.format(bad))
    assert record["event"] == "library_log" and record["level"] == "warning"
    assert record["logger"] == "pg8000" and "role %s and %s" in record["message"]


@functools.cache
def _package_trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def test_waypoint_logs_only_through_event_logger() -> None:
    """Every line of Waypoint's own is an event with named fields: no module but the logging
    module itself uses the stdlib ``logging`` API (whose lines would be free text)."""
    offenders = []
    for path, tree in _package_trees():
        if path == PACKAGE / "observability" / "log.py":
            continue
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "logging" or n.startswith("logging.") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, offenders


def _logged_events() -> dict[str, set[str]]:
    """Every event the package logs (``log.info("name", field=...)``, ``self.log...``,
    ``self._log...``, the burst logs' ``BurstLog(log, "name")``) with the fields named at its
    call sites."""
    events: dict[str, set[str]] = {}
    for _, tree in _package_trees():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            first = node.args[0] if isinstance(node.func, ast.Attribute) else None
            if (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in ("debug", "info", "warning", "error")
                and ast.unparse(node.func.value).split(".")[-1] in ("log", "_log")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                fields = {k.arg for k in node.keywords if k.arg and k.arg != "exc_info"}
                events.setdefault(first.value, set()).update(fields)
            elif (
                isinstance(node.func, ast.Name)
                and node.func.id == "BurstLog"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                events.setdefault(str(node.args[1].value), set())
    return events


def test_docs_list_every_event_with_its_fields() -> None:
    doc = (PACKAGE.parent / "docs" / "observability.md").read_text()
    rows: dict[str, str] = {}
    for line in doc.splitlines():
        match = re.match(r"\| `([a-z_]+)` \| (debug|info|warning|error)", line)
        if match:
            rows[match.group(1)] = line
    events = _logged_events()
    assert len(events) > 50, sorted(events)  # the scan finds the call sites
    assert not sorted(set(events) - set(rows)), "events missing from docs/observability.md"
    assert sorted(set(rows) - set(events)) == ["library_log"], "rows for events nobody logs"
    for event, fields in events.items():
        missing = sorted(f for f in fields if f"`{f}`" not in rows[event])
        assert not missing, (event, missing)


def test_event_fields_named_like_stable_keys_do_not_overwrite_them(
    json_log: io.StringIO,
) -> None:
    get_logger("test").info("something_happened", level="other", conn_id="abc", extra=1)
    (record,) = parse_lines(json_log)
    assert record["event"] == "something_happened"
    assert record["level"] == "info" and record["field_level"] == "other"
    assert record["conn_id"] == "abc" and record["extra"] == 1


def test_human_format_is_one_readable_line_with_the_source_of_library_records() -> None:
    with configured_log("human") as buffer:
        logging.getLogger("pg8000.core").warning("server closed %s", "the connection")
        get_logger("session").info("connection_end", login="a b", bytes_in=3, role=None)
    first, second = buffer.getvalue().splitlines()
    assert first.endswith(
        'WARNING library_log logger=pg8000.core message="server closed the connection"'
    )
    assert second.endswith('INFO    connection_end login="a b" bytes_in=3')


# -- client-chosen values never reach the log raw ---------------------------------------------

# Control characters, C1 controls, line separators and a bidirectional override.
HOSTILE = "app\rFORGED level=error\x1b[2K\n2026-01-01 fake\x85\x9b31m\x7f\u2028\u2029\u202e\x00"

# Every field a client chooses (directly, or through its node name or its refusal).
CLIENT_FIELDS = (
    "db",
    "login",
    "node",
    "user",
    "application_name",
    "server_name",
    "domain",
    "peer",
    "role",
    "detail",
    "error",
)


def _assert_printable_lines(text: str, count: int) -> list[str]:
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == count + 1, lines
    for line in lines[:-1]:
        assert line.isprintable(), [c for c in line if not c.isprintable()]
    return lines[:-1]


@pytest.mark.parametrize("field", CLIENT_FIELDS)
@pytest.mark.parametrize("fmt", ["human", "json"])
def test_control_characters_in_a_client_chosen_field_are_escaped(fmt: Format, field: str) -> None:
    with configured_log(fmt) as buffer:
        get_logger("session").info("connection_end", **{field: HOSTILE, "outcome": "refused"})
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            get_logger("session").error("session_internal_error", exc_info=True, **{field: "x"})
        logging.getLogger("redis").warning("role name %s is taken", HOSTILE)
    first, second, third = _assert_printable_lines(buffer.getvalue(), 3)
    if fmt == "json":
        assert json.loads(first)[field] == HOSTILE
        assert json.loads(second)["exception"] == f"ValueError: {HOSTILE}"
        assert json.loads(third)["message"] == f"role name {HOSTILE} is taken"
    else:
        escaped = (
            r'"app\rFORGED level=error\x1b[2K\n2026-01-01 fake\x85\x9b31m\x7f'
            r'\u2028\u2029\u202e\x00"'
        )
        assert f" {field}={escaped} " in first + " "
        assert "outcome=refused" in first
        assert r'exception="ValueError: app\rFORGED' in second
        assert third.endswith(
            r'library_log logger=redis message="role name app\rFORGED level=error\x1b[2K\n'
            r'2026-01-01 fake\x85\x9b31m\x7f\u2028\u2029\u202e\x00 is taken"'
        )


def test_human_values_keep_printable_unicode_and_quote_what_could_split_them() -> None:
    with configured_log("human") as buffer:
        get_logger("session").info("e", a="héllo", b='x" y=1', c="back\\slash", d="")
    (line,) = _assert_printable_lines(buffer.getvalue(), 1)
    assert line.endswith(r' e a=héllo b="x\" y=1" c="back\\slash" d=""')


@pytest.mark.pg
@pytest.mark.parametrize("fmt", ["human", "json"])
async def test_hostile_database_and_application_name_end_to_end(
    pg15: PgCluster, fmt: Format
) -> None:
    db = create_app_database(pg15)
    config = load_config_text(config_text(pg15, db), source="logs.toml")
    hostile_db = db + "\rFORGED\x1b[2K\x85"
    with configured_log(fmt) as buffer:
        async with run_waypoint(config) as running:
            # Not granted: a refusal whose detail and log line carry the client's name.
            sqlstate, _ = await refused_sqlstate(
                running, hostile_db, application_name="psql\x1b]0;pwned\x07"
            )
            assert sqlstate == "42501"  # no grant for that database
            conn = await connect(running, db, application_name="ok\r\x1b[1A")
            await query(conn, "SELECT 1")
            conn.close()
    text = buffer.getvalue()
    lines = _assert_printable_lines(text, text.count("\n"))
    ends = [line for line in lines if "connection_end" in line]
    assert len(ends) == 2, lines
    if fmt == "json":
        assert hostile_db in [json.loads(line)["db"] for line in ends]
    else:
        assert any(r"FORGED\x1b[2K\x85" in line for line in ends)
