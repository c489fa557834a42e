"""Logs (docs/observability.md): JSON lines with stable keys, stdlib records rendered as JSON too, the
58000 correlation id findable in the log, and no password or role secret in any line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from e2e_support import (
    StaticPeer,
    create_app_database,
    db_rule,
    make_static_config_text,
    run_waypoint,
)
from pgcluster import PgCluster
from test_metrics import LISTENER, connect, query, refused_sqlstate

from waypoint.config.load import load_config_text
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.observability.log import LOGGER_NAME, STABLE_KEYS, configure, get_logger
from waypoint.provision.engine import Credentials, Provisioner


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Waypoint's log tree as JSON lines into a buffer; the logger is restored afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    buffer = io.StringIO()
    configure("json", stream=buffer)
    try:
        yield buffer
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def parse_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


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

    # The provisioning engine's plain stdlib messages are JSON lines too.
    engine = [r for r in records if r["event"] == "provision.engine"]
    assert any(str(r.get("message", "")).startswith("created role ") for r in engine), engine

    # The correlation id the client was shown is in the log.
    cid = message.rsplit("correlation id ", 1)[1].rstrip(")")
    assert len(cid) >= 8
    with_cid = [r for r in records if cid in json.dumps(r)]
    assert any(r["event"] == "connection_end" and r["sqlstate"] == "58000" for r in with_cid)

    # No password and no role secret in any line.
    text = json_log.getvalue()
    assert len(role_secrets) >= 2  # alice's role and her readonly-preset role
    for secret in [pg15.admin_password, pg15.superuser_password, *role_secrets]:
        assert secret not in text


def test_stdlib_records_are_json_lines_named_by_their_logger(json_log: io.StringIO) -> None:
    logging.getLogger("waypoint.provision.admin").info("pool ready for %s", "app")
    (record,) = parse_lines(json_log)
    assert record["event"] == "provision.admin" and record["level"] == "info"
    assert record["message"] == "pool ready for app"
    assert record["conn_id"] is None


def test_stdlib_record_with_bad_format_args_still_formats_as_json(json_log: io.StringIO) -> None:
    (handler,) = [
        h
        for h in logging.getLogger(LOGGER_NAME).handlers
        if isinstance(h, logging.StreamHandler) and h.stream is json_log
    ]
    bad = logging.LogRecord(
        "waypoint.provision.engine", logging.WARNING, __file__, 1, "role %s and %s", ("x",), None
    )
    record = json.loads(handler.format(bad))
    assert record["event"] == "provision.engine" and record["level"] == "warning"
    assert "role %s and %s" in record["message"]


def test_event_fields_named_like_stable_keys_do_not_overwrite_them(
    json_log: io.StringIO,
) -> None:
    get_logger("test").info("something_happened", level="other", conn_id="abc", extra=1)
    (record,) = parse_lines(json_log)
    assert record["event"] == "something_happened"
    assert record["level"] == "info" and record["field_level"] == "other"
    assert record["conn_id"] == "abc" and record["extra"] == 1


def test_human_format_is_one_readable_line_with_the_source_of_stdlib_records() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    buffer = io.StringIO()
    configure("human", stream=buffer)
    try:
        logging.getLogger("waypoint.provision.engine").info("created role %s", "wp_x")
        get_logger("session").info("connection_end", login="a b", bytes_in=3, role=None)
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    first, second = buffer.getvalue().splitlines()
    assert first.endswith("INFO    provision.engine: created role wp_x")
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


@contextlib.contextmanager
def captured(fmt: str) -> Iterator[io.StringIO]:
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    buffer = io.StringIO()
    configure("json" if fmt == "json" else "human", stream=buffer)
    try:
        yield buffer
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def _assert_printable_lines(text: str, count: int) -> list[str]:
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == count + 1, lines
    for line in lines[:-1]:
        assert line.isprintable(), [c for c in line if not c.isprintable()]
    return lines[:-1]


@pytest.mark.parametrize("field", CLIENT_FIELDS)
@pytest.mark.parametrize("fmt", ["human", "json"])
def test_control_characters_in_a_client_chosen_field_are_escaped(fmt: str, field: str) -> None:
    with captured(fmt) as buffer:
        get_logger("session").info("connection_end", **{field: HOSTILE, "outcome": "refused"})
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            get_logger("session").error("session_internal_error", exc_info=True, **{field: "x"})
        logging.getLogger("waypoint.provision.engine").info("role name %s is taken", HOSTILE)
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
            r"provision.engine: role name app\rFORGED level=error\x1b[2K\n"
            r"2026-01-01 fake\x85\x9b31m\x7f\u2028\u2029\u202e\x00 is taken"
        )


def test_human_values_keep_printable_unicode_and_quote_what_could_split_them() -> None:
    with captured("human") as buffer:
        get_logger("session").info("e", a="héllo", b='x" y=1', c="back\\slash", d="")
    (line,) = _assert_printable_lines(buffer.getvalue(), 1)
    assert line.endswith(r' e a=héllo b="x\" y=1" c="back\\slash" d=""')


@pytest.mark.pg
@pytest.mark.parametrize("fmt", ["human", "json"])
async def test_hostile_database_and_application_name_end_to_end(pg15: PgCluster, fmt: str) -> None:
    db = create_app_database(pg15)
    config = load_config_text(config_text(pg15, db), source="logs.toml")
    hostile_db = db + "\rFORGED\x1b[2K\x85"
    with captured(fmt) as buffer:
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
