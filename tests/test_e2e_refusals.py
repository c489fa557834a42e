"""Refusals a person can read (docs/protocol.md): through psql with ``sslmode=prefer`` (libpq retries
without TLS after an error, and the retry shows the same reason without a second whois, thanks
to the refusal cache of step 8), with the SQLSTATE checked through psycopg."""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pg8000.native
import pytest
import trio
from e2e_support import (
    LISTENER,
    CertFiles,
    E2EEnv,
    create_app_database,
    db_rule,
    e2e_env,
    make_cert_files,
)
from pgcluster import PgCluster

from waypoint.proxy.source import ConnectingSource

SYSTEM_PSQL = "/usr/bin/psql"


_checks = itertools.count(1)


def _sqlstate_of(
    host: str, port: int, db: str, *, tls: bool | None = None, **startup: str
) -> tuple[str | None, str]:
    """The SQLSTATE of a refused login, as pg8000 reports the ErrorResponse fields (libpq
    clients see connection errors as text only). ``tls``: None tries TLS first (pg8000's
    default), False never."""
    try:
        conn = pg8000.native.Connection(
            user="anyone",
            host=host,
            port=port,
            database=db,
            timeout=20,
            application_name=f"probe{next(_checks)}",
            ssl_context=tls,
            startup_params=startup,
        )
    except pg8000.native.DatabaseError as exc:
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        return fields.get("C"), str(fields.get("M", exc))
    conn.close()
    return None, "connected"


async def _refused(
    env: E2EEnv,
    db: str,
    *,
    fragment: str,
    sqlstate: str,
    whois: int | None,
    options: str | None = None,
) -> str:
    """psql (prefer) is refused with ``fragment`` on every attempt; psycopg sees ``sqlstate``.
    ``whois``: how many whois requests the psql attempts may cost (None: not checked)."""
    # A fresh application_name per check: an earlier refusal is cached for 5 s per startup
    # packet, and a test changes grants faster than that.
    tag = f"check{next(_checks)}"
    before = env.standin.whois_count("127.0.0.1")
    if options:
        r = await env.psql(
            "select 1",
            db,
            sslmode="prefer",
            binary=SYSTEM_PSQL,
            application_name=tag,
            options=f"'{options}'",
        )
    else:
        r = await env.psql("select 1", db, sslmode="prefer", binary=SYSTEM_PSQL, application_name=tag)
    after = env.standin.whois_count("127.0.0.1")
    assert r.returncode != 0, r.stdout
    assert fragment in r.stderr, r.stderr
    # libpq reports both attempts: the TLS one and the plaintext retry; both carry the reason.
    attempts = [line for line in r.stderr.splitlines() if "FATAL" in line]
    assert attempts and all(fragment in line for line in attempts), r.stderr
    if whois is not None:
        assert after - before == whois, (before, after, r.stderr)
    state, message = await trio.to_thread.run_sync(
        lambda: _sqlstate_of(env.host, env.port, db, options=options)
        if options
        else _sqlstate_of(env.host, env.port, db)
    )
    assert state == sqlstate, (state, message)
    assert fragment in message
    return r.stderr


async def _asyncpg_error(env: E2EEnv, db: str) -> str:
    try:
        conn = await asyncpg.connect(
            host=env.host, port=env.port, user="u", database=db, ssl="prefer", timeout=20
        )
    except asyncpg.PostgresError as exc:
        return str(exc)
    await conn.close(timeout=5)
    return "connected"


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return make_cert_files(tmp_path / "certs")


async def test_refusals_are_readable_and_the_retry_costs_no_second_whois(
    pg: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(pg)
    other = create_app_database(pg)
    with trio.fail_after(150):
        async with e2e_env(
            pg, tmp_path, tls_mode="optional", listener_extra=certs.listener_extra()
        ) as env:
            # No grant for this listener (a grant for another one only).
            env.grant("127.0.0.1", rules=[db_rule({db: {"permissions": ["readonly"]}}, listener="pg-other")])
            stderr = await _refused(
                env, db, fragment=f'no Waypoint grant for listener "{LISTENER}"', sqlstate="28000", whois=1
            )
            assert len([ln for ln in stderr.splitlines() if "FATAL" in ln]) == 2, stderr

            # Database not granted.
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            await _refused(
                env, other, fragment=f'not authorized for database "{other}"', sqlstate="42501", whois=1
            )

            # A bad preset parameter (refused before any whois).
            await _refused(
                env,
                db,
                fragment="preset",
                sqlstate="22023",
                whois=0,
                options="-c waypoint.presets=superuser",
            )

            # Nonexistent database: the backend's own 3D000, forwarded verbatim.
            env.grant("127.0.0.1", {"no_such_db_here": {"permissions": ["readonly"]}})
            stderr = await _refused(
                env,
                "no_such_db_here",
                fragment='database "no_such_db_here" does not exist',
                sqlstate="3D000",
                whois=None,
            )

            # Over the connection limit: one session held by pg8000 (same identity).
            env.grant(
                "127.0.0.1",
                rules=[db_rule({db: {"permissions": ["readonly"]}}, limits={"max_conns": 1})],
            )
            held = await env.pg8000_connect(db)
            try:
                assert await trio.to_thread.run_sync(held.run, "select 1") == [[1]]
                # 53300 is transient: not cached, so each attempt asks whois again.
                await _refused(env, db, fragment="too many connections", sqlstate="53300", whois=2)
            finally:
                await trio.to_thread.run_sync(held.close)
            r = await env.psql("select 1", db, sslmode="prefer", binary=SYSTEM_PSQL)
            assert r.returncode == 0, r.stderr
            await env.assert_clean()


async def test_backend_down_is_08006_and_not_cached(pg15: PgCluster, tmp_path: Path, certs: CertFiles) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens there once closed
    with trio.fail_after(60):
        async with e2e_env(
            pg15,
            tmp_path,
            tls_mode="optional",
            listener_extra=certs.listener_extra(),
            backend=f"127.0.0.1:{dead_port}",
        ) as env:
            env.grant("127.0.0.1", {"whatever": {"permissions": ["readonly"]}})
            await _refused(env, "whatever", fragment="unavailable", sqlstate="08006", whois=2)
            await env.assert_clean()


async def test_a_refused_peer_gets_no_byte_to_the_backend(pg15: PgCluster, tmp_path: Path) -> None:
    """A peer this listener has not served lately opens no backend connection before it is
    identified and granted (a scan or an ungranted peer makes the server fork nothing). A
    peer served lately has its session's backend connection opened while the whois runs;
    if the whois or the grant then refuses it, that connection is closed without a byte
    sent on it (no startup packet, no login). The backend here is a listener that records
    what each connection sends."""
    admin = pg15.admin_user.encode()
    sentinel = b"sentinel"
    # What each connection sent so far, and whether it was closed.
    received: list[tuple[bytearray, trio.Event]] = []

    async def record(stream: trio.SocketStream) -> None:
        data, closed = bytearray(), trio.Event()
        received.append((data, closed))
        with trio.move_on_after(60):
            while chunk := await stream.receive_some(65536):
                data += chunk
                if admin in data or sentinel in data:
                    break  # the admin connection's: refused at once (nothing here is a server)
        closed.set()
        await stream.aclose()

    def sessions() -> list[tuple[bytearray, trio.Event]]:
        # The admin connection may speak to this backend too (its startup packet names the
        # admin user); the rest are the sessions' connections (and the test's sentinel).
        return [(d, c) for d, c in received if admin not in d]

    async def refuse_twice(env: E2EEnv) -> None:
        # Identified, but no grant for this database.
        state, _ = await trio.to_thread.run_sync(
            lambda: _sqlstate_of(env.host, env.port, "other", tls=False)
        )
        assert state == "42501"
        # Nobody the whois knows.
        with pytest.raises(pg8000.native.DatabaseError):
            await env.pg8000_connect("granted", source="127.0.0.9")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, record, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(60):
            async with e2e_env(pg15, tmp_path, backend=f"127.0.0.1:{port}") as env:
                env.grant("127.0.0.1", {"granted": {"permissions": ["readonly"]}})
                await refuse_twice(env)
                # Connections are accepted in order: once the sentinel's is recorded, any
                # the refused sessions had opened would have been recorded before it.
                probe = await trio.open_tcp_stream("127.0.0.1", port)
                await probe.send_all(sentinel)
                while not any(sentinel in d for d, _ in received):
                    await trio.sleep(0.02)
                await probe.aclose()
                assert [bytes(d) for d, _ in sessions()] == [sentinel], received

                # Both peers served lately: their connections open during the lookup.
                source = env.running.contexts[LISTENER].backends
                assert isinstance(source, ConnectingSource)
                source.served("127.0.0.1")
                source.served("127.0.0.9")
                await refuse_twice(env)
                while len(sessions()) < 2 or not all(c.is_set() for _, c in sessions()):
                    await trio.sleep(0.02)
                early = [bytes(d) for d, _ in sessions()][1:]
                assert early and early == [b""] * len(early), received
        nursery.cancel_scope.cancel()


async def test_tls_required_refuses_plaintext_and_repeats_the_cached_reason(
    pg15: PgCluster, tmp_path: Path, certs: CertFiles
) -> None:
    db = create_app_database(pg15)
    with trio.fail_after(60):
        async with e2e_env(
            pg15, tmp_path, tls_mode="require", listener_extra=certs.listener_extra()
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            r = await env.psql("select 1", db, sslmode="disable", binary=SYSTEM_PSQL)
            assert r.returncode != 0
            assert "TLS is required" in r.stderr, r.stderr
            state, message = await trio.to_thread.run_sync(lambda: _sqlstate_of(env.host, env.port, db, tls=False))
            assert state == "28000", message
            assert "TLS is required" in message
            r = await env.psql("select 1", db, sslmode="prefer", binary=SYSTEM_PSQL)
            assert r.returncode == 0, r.stderr
            # Refused over TLS (no grant): the plaintext retry says "TLS is required" and repeats
            # the first reason, with no second whois.
            env.grant("127.0.0.1", rules=[db_rule({db: {"permissions": ["readonly"]}}, listener="pg-other")])
            before = env.standin.whois_count("127.0.0.1")
            r = await env.psql("select 1", db, sslmode="prefer", binary=SYSTEM_PSQL, application_name="second")
            assert r.returncode != 0
            assert env.standin.whois_count("127.0.0.1") - before == 1
            fatal = [ln for ln in r.stderr.splitlines() if "FATAL" in ln]
            assert len(fatal) == 2, r.stderr
            assert "no Waypoint grant" in fatal[0]
            assert "TLS is required" in fatal[1] and "no Waypoint grant" in fatal[1], r.stderr

            # asyncpg (ssl="prefer") shows the user only the second error: it names the reason.
            before = env.standin.whois_count("127.0.0.1")
            message = await trio.to_thread.run_sync(asyncio.run, _asyncpg_error(env, db))
            assert "TLS is required" in message and "no Waypoint grant" in message, message
            assert env.standin.whois_count("127.0.0.1") - before == 1
            await env.assert_clean()
