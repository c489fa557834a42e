"""The Prometheus endpoint (docs/observability.md): counters move with real connections, every family
has HELP text, and no label identifies a user."""

from __future__ import annotations

from typing import Any

import pg8000.native
import pytest
import trio
from e2e_support import (
    StaticPeer,
    create_app_database,
    db_rule,
    make_static_config_text,
    run_waypoint,
)
from pgcluster import PgCluster
from prometheus_client.parser import text_string_to_metric_families

from waypoint.app import Running
from waypoint.config.load import load_config_text

LISTENER = "pg-main"


def static_config(cluster: PgCluster, db: str) -> str:
    alice = StaticPeer(
        "127.0.0.1/32",
        "alice@example.com",
        "alice-laptop",
        [db_rule({db: {"permissions": ["readonly"]}}, listener=LISTENER)],
    )
    return make_static_config_text(
        cluster, [alice], tables_extra='[metrics]\nlisten = "127.0.0.1:0"'
    )


async def connect(
    running: Running, db: str, *, source: str = "127.0.0.1", **kwargs: Any
) -> pg8000.native.Connection:
    host, port = running.address(LISTENER)

    def _connect() -> pg8000.native.Connection:
        return pg8000.native.Connection(
            "anyone",
            host=host,
            port=port,
            database=db,
            source_address=(source, 0),
            timeout=30,
            **kwargs,
        )

    return await trio.to_thread.run_sync(_connect)


async def query(conn: pg8000.native.Connection, sql: str) -> list[list[Any]]:
    rows: list[list[Any]] = await trio.to_thread.run_sync(conn.run, sql)
    return rows


async def refused_sqlstate(running: Running, db: str, **kwargs: Any) -> tuple[str, str]:
    """Connect expecting a refusal; returns (SQLSTATE, message)."""
    try:
        conn = await connect(running, db, **kwargs)
    except pg8000.exceptions.DatabaseError as exc:
        fields = exc.args[0]
        return str(fields["C"]), str(fields["M"])
    conn.close()
    raise AssertionError("the connection was not refused")


async def http_get(address: tuple[str, int], path: str) -> tuple[int, dict[str, str], str]:
    """A minimal HTTP/1.1 GET (the endpoint closes the connection after the response)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n".encode()
            )
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_until_idle(running: Running) -> str:
    """Scrape until no connection is open (a connection's metrics settle when its task ends)."""
    assert running.metrics_address is not None
    with trio.fail_after(15):
        while True:
            status, _, body = await http_get(running.metrics_address, "/metrics")
            assert status == 200
            if value(body, "waypoint_connections_active", listener=LISTENER) == 0:
                return body
            await trio.sleep(0.05)


@pytest.mark.pg
async def test_metrics_count_connections_refusals_handshakes_and_bytes(
    pg15: PgCluster,
) -> None:
    db = create_app_database(pg15)
    config = load_config_text(static_config(pg15, db), source="metrics.toml")
    async with run_waypoint(config) as running:
        assert running.metrics_address is not None
        status, headers, before = await http_get(running.metrics_address, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert value(before, "waypoint_connections_total", listener=LISTENER) == 0

        for _ in range(2):
            conn = await connect(running, db)
            assert await query(conn, "SELECT v FROM t") == [["one"]]
            conn.close()
        # 127.0.0.9 has no static identity: refused like an unknown tailnet peer.
        assert (await refused_sqlstate(running, db, source="127.0.0.9"))[0] == "28000"
        # A database outside the grant.
        assert (await refused_sqlstate(running, "postgres"))[0] == "42501"

        body = await scrape_until_idle(running)
        assert value(body, "waypoint_connections_total", listener=LISTENER) == 4
        assert (
            value(body, "waypoint_connections_refused_total", listener=LISTENER, sqlstate="28000")
            == 1
        )
        assert (
            value(body, "waypoint_connections_refused_total", listener=LISTENER, sqlstate="42501")
            == 1
        )
        assert value(body, "waypoint_handshake_seconds_count", listener=LISTENER) == 2
        assert value(body, "waypoint_handshake_seconds_sum", listener=LISTENER) > 0
        # One role, provisioned once; the second connection reused its cached secret.
        assert value(body, "waypoint_provision_seconds_count", listener=LISTENER) == 1
        assert value(body, "waypoint_provision_errors_total", listener=LISTENER) == 0
        for direction in ("client_to_backend", "backend_to_client"):
            assert (
                value(body, "waypoint_relayed_bytes_total", listener=LISTENER, direction=direction)
                > 0
            )
        assert (
            value(body, "waypoint_sessions_ended_total", listener=LISTENER, outcome="refused") == 2
        )
        # The second login of 127.0.0.1 got the backend its first one left idle (same role,
        # database and parameters): one miss, one hit, one reset (after each clean end).
        assert value(body, "waypoint_pool_misses_total", listener=LISTENER) == 1
        assert value(body, "waypoint_pool_hits_total", listener=LISTENER) == 1
        assert value(body, "waypoint_pool_resets_total", listener=LISTENER, outcome="ok") == 2
        assert value(body, "waypoint_pool_idle", listener=LISTENER) == 1


@pytest.mark.pg
async def test_metrics_families_have_help_and_no_per_user_labels(pg15: PgCluster) -> None:
    db = create_app_database(pg15)
    config = load_config_text(static_config(pg15, db), source="metrics.toml")
    async with run_waypoint(config) as running:
        conn = await connect(running, db)
        await query(conn, "SELECT 1")
        conn.close()
        body = await scrape_until_idle(running)
        families = list(text_string_to_metric_families(body))
        names = {f.name for f in families}
        expected = {
            "waypoint_connections_active",
            "waypoint_connections",
            "waypoint_connections_refused",
            "waypoint_sessions_ended",
            "waypoint_handshake_seconds",
            "waypoint_provision_seconds",
            "waypoint_provision_errors",
            "waypoint_backend_login_failures",
            "waypoint_pool_idle",
            "waypoint_pool_hits",
            "waypoint_pool_misses",
            "waypoint_pool_resets",
            "waypoint_relayed_bytes",
            "waypoint_revalidation_runs",
            "waypoint_revalidation_failures",
            "waypoint_reaper_runs",
            "waypoint_reaper_dropped_roles",
        }
        assert expected <= names, sorted(expected - names)
        for family in families:
            if family.name.startswith("waypoint_"):
                assert family.documentation.strip(), f"{family.name} has no HELP text"
                for s in family.samples:
                    assert not {"login", "user", "node", "role", "peer"} & set(s.labels), s
        assert "alice" not in body


@pytest.mark.pg
async def test_metrics_endpoint_answers_404_off_path(pg15: PgCluster) -> None:
    db = create_app_database(pg15)
    config = load_config_text(static_config(pg15, db), source="metrics.toml")
    async with run_waypoint(config) as running:
        assert running.metrics_address is not None
        status, _, body = await http_get(running.metrics_address, "/")
        assert status == 404
        assert "waypoint_" not in body
