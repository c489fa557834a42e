"""Hostile clients against a running Waypoint (docs/security.md, hostile clients).

Each attack gets a clear ErrorResponse (SQLSTATE and message, read with a raw socket) or a
clean close within the handshake timeout (2 s here); a refused caller gets no role; no SQL
smuggled through the startup packet runs (the cluster logs every statement, and the log is
parsed with PostgreSQL's own parser); and the listener serves a normal client after each one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pg8000.native
import pglast
import pytest
import trio
from e2e_support import (
    SSL_REQUEST,
    CertFiles,
    E2EEnv,
    WireReply,
    create_app_database,
    hostile_client_env,
    make_cert_files,
    raw_exchange,
    raw_startup_packet,
    roles_with_prefix,
    tls_client_hello,
)
from fixtures_pg import PrivatePg
from pgcluster import PgCluster

HANDSHAKE = 2.0
PREFIX = "wp_"
ATTACKER = "127.0.0.66"
INJECTION = "x'; DROP TABLE t; --"

pytestmark = pytest.mark.pg


@pytest.fixture(scope="module", params=["system", "18"], ids=["pg15", "pg18"])
def logged_pg(request: pytest.FixtureRequest, private_pg: PrivatePg) -> Iterator[PgCluster]:
    """A cluster of its own that logs every statement (to prove what ran and what did not),
    PostgreSQL 15 and 18."""
    with private_pg(request.param, log_statement="all") as cluster:
        yield cluster


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return make_cert_files(tmp_path / "certs")


async def _send(
    env: E2EEnv, chunks: list[bytes], *, source: str = ATTACKER, delay: float = 0.0
) -> WireReply:
    """Send ``chunks`` raw from ``source`` and read what comes back until the server closes
    (bounded: a hang fails the test)."""
    with trio.fail_after(15):
        return await raw_exchange(env.host, env.port, chunks, source=source, delay=delay)


async def _normal_client_works(env: E2EEnv, db: str) -> None:
    """The granted identity 127.0.0.1 connects and reads its table.

    The 2 s handshake timeout is short for a machine shared by several test runs: a login that
    timed out (08006 "handshake timed out", never anything else) is tried once more."""
    try:
        conn = await env.pg8000_connect(db)
    except pg8000.native.DatabaseError as exc:
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        if fields.get("C") != "08006" or "timed out" not in str(fields.get("M")):
            raise
        conn = await env.pg8000_connect(db)
    try:
        rows = await trio.to_thread.run_sync(conn.run, "SELECT v FROM public.t WHERE id = 1")
        assert rows == [["one"]]
    finally:
        await trio.to_thread.run_sync(conn.close)


def _assert_closed_in_time(reply: WireReply | None, what: str) -> None:
    """The server closed before the raw client gave up (its timeout is the bound)."""
    assert reply is not None
    assert reply.closed, f"{what}: the server did not close the connection in time"
    assert not reply.authenticated, f"{what}: the client was authenticated"


def _executed_statements(log: str) -> list[str]:
    """The SQL text of every statement the server logged as executed (simple and extended
    protocol), continuation lines included."""
    entry_start = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    entries: list[str] = []
    for line in log.splitlines():
        if entry_start.match(line) or not entries:
            entries.append(line)
        else:
            entries[-1] += "\n" + line
    out: list[str] = []
    marker = re.compile(r"LOG:  (?:statement|execute [^:]*): ", re.S)
    for entry in entries:
        m = marker.search(entry)
        if m:
            out.append(entry[m.end() :])
    return out


def _statement_kinds(sql: str) -> list[str]:
    return [type(raw.stmt).__name__ for raw in pglast.parse_sql(sql)]


async def test_slowloris_startup_is_closed_by_the_handshake_timeout(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(logged_pg)
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        env.grant(ATTACKER, {db: {"permissions": ["readonly"]}}, login="slow@example.com")
        packet = raw_startup_packet({"user": "slow", "database": db})
        give_up = HANDSHAKE * 10
        # The trickle outlasts the client's wait: only a handshake deadline that the trickling
        # bytes do not push back closes the connection before the client gives up.
        assert len(packet) * 1.0 > give_up + HANDSHAKE
        reply: WireReply | None = None

        async def attack() -> None:
            nonlocal reply
            reply = await raw_exchange(
                env.host, env.port, [bytes([b]) for b in packet], source=ATTACKER, delay=1.0,
                timeout=give_up,
            )

        with trio.fail_after(give_up + 20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                await trio.sleep(0.5)
                # Served while the slow client holds its connection open.
                await _normal_client_works(env, db)
        _assert_closed_in_time(reply, "slowloris")
        assert reply is not None and reply.data == b""  # no startup yet: a silent close
        assert env.standin.whois_count(ATTACKER) == 0
        assert not {r for r in roles_with_prefix(logged_pg, PREFIX) if "slow_example_com" in r}
        await _normal_client_works(env, db)
        await env.assert_clean()


BAD_LENGTHS = [
    (10005, "one past PostgreSQL's limit"),
    (0x7FFFFFFF, "2 GiB"),
    (0xFFFFFFFF, "negative as int32"),
    (7, "shorter than its header"),
    (0, "zero"),
]


async def test_first_packet_length_out_of_range_is_refused_with_08p01(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(logged_pg)
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        for length, what in BAD_LENGTHS:
            packet = length.to_bytes(4, "big") + (3 << 16).to_bytes(4, "big") + b"user\0x\0\0"
            reply = await _send(env, [packet])
            _assert_closed_in_time(reply, what)
            err = reply.error
            assert err is not None, (what, reply.data)
            assert err["S"] == "FATAL" and err["C"] == "08P01", (what, err)
            assert "length" in err["M"], (what, err)
            await _normal_client_works(env, db)
        assert env.standin.whois_count(ATTACKER) == 0


async def test_first_packet_that_claims_more_than_it_sends_is_closed_in_time(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(logged_pg)
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        packet = (10004).to_bytes(4, "big") + (3 << 16).to_bytes(4, "big") + b"user\0x\0"
        reply = await _send(env, [packet])
        _assert_closed_in_time(reply, "short packet")
        assert reply.data == b""
        await _normal_client_works(env, db)


async def test_startup_with_10000_parameters_is_refused(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(logged_pg)
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        env.grant(ATTACKER, {db: {"permissions": ["readonly"]}}, login="many@example.com")
        before = roles_with_prefix(logged_pg, PREFIX)
        params = [("user", "many"), ("database", db)] + [(f"p{i}", "v") for i in range(10_000)]
        packet = raw_startup_packet(params)
        assert len(packet) > 10004
        reply = await _send(env, [packet])
        _assert_closed_in_time(reply, "10,000 parameters")
        err = reply.error
        assert err is not None and err["C"] == "08P01", (err, reply.data[:200])
        assert "length" in err["M"], err
        assert env.standin.whois_count(ATTACKER) == 0
        assert roles_with_prefix(logged_pg, PREFIX) <= before  # none created
        await _normal_client_works(env, db)


async def test_direct_tls_without_alpn_postgresql_is_closed(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(logged_pg)
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        for alpn in [(), ("http/1.1",)]:
            hello = tls_client_hello(alpn=alpn)
            assert hello[0] == 0x16
            reply = await _send(env, [hello])
            _assert_closed_in_time(reply, f"direct TLS with ALPN {alpn}")
            # Nothing in plaintext and no ServerHello: at most a TLS alert record.
            assert reply.data == b"" or reply.data[0] == 0x15, (alpn, reply.data[:40])
            await _normal_client_works(env, db)


TLS_GARBAGE = [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP request"),
    (b"\x16\x03\x01\x00\x20" + b"\xff" * 32, "handshake record with a garbage body"),
    (b"\x16\x03\x01\xff\xff" + b"\x01" * 10, "handshake record that never completes"),
    (b"\x00" * 64, "zeros"),
    (raw_startup_packet({"user": "x"}), "a plaintext startup after S"),
]


async def test_tls_handshake_garbage_after_s_is_closed(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(logged_pg)
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        for garbage, what in TLS_GARBAGE:
            # The garbage goes after the answer (a client sending it earlier is refused anyway).
            reply = await _send(env, [SSL_REQUEST, garbage], delay=0.2)
            _assert_closed_in_time(reply, what)
            assert reply.data[:1] == b"S", (what, reply.data[:40])
            rest = reply.data[1:]
            assert rest == b"" or rest[0] == 0x15, (what, rest[:40])
            await _normal_client_works(env, db)
        assert env.standin.whois_count(ATTACKER) == 0


async def test_sql_injection_in_startup_parameters_runs_nothing(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(logged_pg)
    log_start = len(logged_pg.read_log())
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        before = roles_with_prefix(logged_pg, PREFIX)

        async def attempt(source: str = "127.0.0.1", **startup: str) -> dict[str, str] | None:
            packet = raw_startup_packet({"user": "attacker", **startup})
            reply = await _send(env, [packet, b"X\0\0\0\4"], source=source)
            assert reply.closed
            return reply.error if not reply.authenticated else None

        # 1. An injected database name that is not granted: 42501, naming it as data.
        err = await attempt(database=INJECTION)
        assert err is not None and err["C"] == "42501", err
        assert f'"{INJECTION}"' in err["M"], err
        assert roles_with_prefix(logged_pg, PREFIX) <= before  # none created
        await _normal_client_works(env, db)
        roles_now = roles_with_prefix(logged_pg, PREFIX)

        # 2. The same name granted through "*" (another identity: refusals are cached per
        #    peer for 5 s): the backend says it does not exist (3D000), forwarded; no role is
        #    created for it.
        env.grant(ATTACKER, {"*": {"permissions": ["readonly"]}}, login="star@example.com")
        err = await attempt(source=ATTACKER, database=INJECTION)
        assert err is not None and err["C"] == "3D000", err
        assert INJECTION in err["M"], err
        assert roles_with_prefix(logged_pg, PREFIX) == roles_now

        # 3. application_name is forwarded as a value, never as SQL.
        conn = await trio.to_thread.run_sync(
            lambda: pg8000.native.Connection(
                user=INJECTION, host=env.host, port=env.port, database=db, timeout=20,
                application_name=INJECTION,
            )
        )
        try:
            rows = await trio.to_thread.run_sync(conn.run, "SHOW application_name")
            assert rows == [[INJECTION]]
        finally:
            await trio.to_thread.run_sync(conn.close)

        # 4. options: an injected -c value is the backend's problem (a FATAL it forwards);
        #    an injected Waypoint preset switch is refused by Waypoint itself (22023).
        err = await attempt(database=db, options=f"-c application_name={INJECTION}")
        assert err is not None and err["S"] == "FATAL", err
        err = await attempt(database=db, options=f"-c waypoint.presets=readonly{INJECTION}")
        assert err is not None and err["C"] == "22023", err
        await _normal_client_works(env, db)

    # Nothing injected ran: every logged statement parses, and none is a DROP of anything.
    executed = _executed_statements(logged_pg.read_log()[log_start:])
    assert executed, "log_statement=all logged nothing"
    for sql in executed:
        kinds = _statement_kinds(sql)
        assert "DropStmt" not in kinds, sql
    assert logged_pg.execute("SELECT v FROM public.t WHERE id = 1", dbname=db) == [["one"]]


WEIRD_IDENTITIES = [
    ("o'brien\"; DROP TABLE t; --@example.com", "it's\\node"),  # quotes, backslash
    ("nul\x00user@example.com", "nul\x00node"),
    ("zoë.名前@例え.jp", "ノード-1"),
    ("a" * 1024 + "@example.com", "n" * 1024),  # 1 kB
]


async def test_identity_strings_from_localapi_are_data(
    logged_pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    """A login or node name full of quotes, backslashes, NULs, Unicode or 1 kB long is data:
    the role name is sanitized, the owner recorded exactly, and nothing is injected."""
    from waypoint.grants.naming import parse_role_comment

    db = create_app_database(logged_pg)
    log_start = len(logged_pg.read_log())
    async with hostile_client_env(logged_pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
        for n, (login, node) in enumerate(WEIRD_IDENTITIES):
            ip = f"127.0.0.{70 + n}"
            env.grant(ip, {db: {"permissions": ["readonly"]}}, login=login, node=node)
            conn = await env.pg8000_connect(db, source=ip)
            try:
                rows = await trio.to_thread.run_sync(
                    conn.run,
                    "SELECT current_user, pg_catalog.shobj_description(r.oid, 'pg_authid'), "
                    "(SELECT v FROM public.t WHERE id = 1) "
                    "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
                )
            finally:
                await trio.to_thread.run_sync(conn.close)
            role, comment, value = rows[0]
            assert re.fullmatch(r"[a-z0-9_]{1,63}", role), (login, role)
            assert value == "one"
            owner = parse_role_comment(comment)
            assert owner is not None, (login, comment)
            assert (owner.login, owner.node, owner.database) == (login, node, db)
            await _normal_client_works(env, db)
    for sql in _executed_statements(logged_pg.read_log()[log_start:]):
        assert "DropStmt" not in _statement_kinds(sql), sql
    assert logged_pg.execute("SELECT count(*) FROM public.t", dbname=db) == [[1]]
