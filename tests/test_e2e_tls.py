"""Client TLS (docs/protocol.md, docs/localapi.md): direct SSL from libpq 18 (``sslnegotiation=direct``),
refusals readable over it, direct TLS without ALPN ``postgresql`` refused; Tailscale certificates
chosen by SNI, fetched once, and a failed fetch falling back to the file certificate. Every
relayed TLS session here is asserted to have run its record layer in C
(``waypoint_client_tls_relays_total{record_layer="c"}``), so a silent fallback to Python fails."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import trio
from cryptography import x509
from e2e_support import (
    LISTENER,
    SSL_REQUEST,
    E2EEnv,
    RawSession,
    capture_logs,
    create_app_database,
    db_rule,
    e2e_env,
    make_cert_files,
    raw_startup_packet,
    tls_session,
)
from pgcluster import PgCluster

from waypoint.proxy.relay import RelayEngine


def _psycopg_direct(dsn: str) -> tuple[bool, str]:
    with psycopg.connect(dsn, connect_timeout=20) as conn:
        row = conn.execute("select v from t").fetchone()
        assert row is not None
        return bool(conn.info.pgconn.ssl_in_use), str(row[0])


def _psycopg_error(dsn: str) -> str:
    try:
        with psycopg.connect(dsn, connect_timeout=20):
            return "connected"
    except psycopg.OperationalError as exc:
        return str(exc)


def _direct_tls(
    env: E2EEnv, *, alpn: list[str] | None, server_name: str | None, cafile: Path | None
) -> x509.Certificate:
    """A direct TLS handshake with the listener (as libpq's sslnegotiation=direct starts);
    returns the server's certificate. Raises ssl.SSLError / OSError if refused."""
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    with (
        socket.create_connection((env.host, env.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def _names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


async def test_direct_ssl_from_libpq_18(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(90):
        async with e2e_env(
            pg, tmp_path, tls_mode="optional", listener_extra=certs.listener_extra()
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            dsn = env.dsn(db, sslmode="require", sslnegotiation="direct")
            ssl_in_use, v = await trio.to_thread.run_sync(_psycopg_direct, dsn)
            assert ssl_in_use and v == "one"

            # verify-full against the trustme CA works too.
            dsn_full = env.dsn(
                db, sslmode="verify-full", sslnegotiation="direct", sslrootcert=str(certs.ca_pem)
            ).replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1")
            ssl_in_use, _ = await trio.to_thread.run_sync(_psycopg_direct, dsn_full)
            assert ssl_in_use

            # A refusal is readable over direct TLS.
            env.grant(
                "127.0.0.1", rules=[db_rule({db: {"permissions": ["readonly"]}}, listener="other")]
            )
            message = await trio.to_thread.run_sync(
                _psycopg_error,
                env.dsn(db, sslmode="require", sslnegotiation="direct", application_name="x"),
            )
            assert f'no Waypoint grant for listener "{LISTENER}"' in message, message

            # Direct TLS without ALPN "postgresql" is refused (no handshake), with ALPN it works.
            cert = await trio.to_thread.run_sync(
                lambda: _direct_tls(env, alpn=["postgresql"], server_name=None, cafile=None)
            )
            assert "localhost" in _names(cert)
            for alpn in (None, ["http/1.1"]):
                try:
                    await trio.to_thread.run_sync(
                        functools.partial(
                            _direct_tls, env, alpn=alpn, server_name=None, cafile=None
                        )
                    )
                except (ssl.SSLError, OSError):
                    pass
                else:
                    raise AssertionError(f"direct TLS with ALPN {alpn} was accepted")
            await env.assert_clean()
            assert env.tls_record_layers() == {"c": 2}  # the two sessions that were relayed


@contextlib.asynccontextmanager
async def _tailscale_tls_env(
    pg: PgCluster, tmp_path: Path, db: str, own: str
) -> AsyncIterator[tuple[E2EEnv, Path]]:
    """Waypoint with a certificate file and ``use_tailscale_tls``, where 127.0.0.1 may read
    ``db`` and tailscaled holds a certificate for ``own``: the env, and the CA file that
    verifies the certificates tailscaled hands out."""
    certs = make_cert_files(tmp_path / "certs")
    async with e2e_env(
        pg,
        tmp_path,
        tls_mode="optional",
        listener_extra=certs.listener_extra() + "\nuse_tailscale_tls = true",
    ) as env:
        env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
        env.standin.add_cert_domain(own)
        ts_ca = tmp_path / "ts-ca.pem"
        env.standin.ca.cert_pem.write_to_path(str(ts_ca))
        yield env, ts_ca


async def test_tailscale_certificate_by_sni_cached_and_file_fallback(
    pg15: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg15)
    name = "waypoint.tail1234.ts.net"
    with trio.fail_after(90):
        async with _tailscale_tls_env(pg15, tmp_path, db, name) as (env, ts_ca):
            other = "other.tail1234.ts.net"
            env.standin.add_cert_domain(other)

            for _ in range(3):
                cert = await trio.to_thread.run_sync(
                    lambda: _direct_tls(env, alpn=["postgresql"], server_name=name, cafile=ts_ca)
                )
                assert _names(cert) == [name]
            fetches = [r for r in env.standin.requests if "/localapi/v0/cert/" in r]
            assert len(fetches) == 1, env.standin.requests

            # A libpq client with SNI through the usual SSLRequest path gets it too.
            ssl_in_use, v = await trio.to_thread.run_sync(
                _psycopg_direct,
                env.dsn(db, sslmode="verify-full", sslrootcert=str(ts_ca)).replace(
                    "host=127.0.0.1", f"host={name} hostaddr=127.0.0.1"
                ),
            )
            assert ssl_in_use and v == "one"

            # A failed fetch (tailscaled refuses) falls back to the file certificate.
            env.standin.set_cert_fault("forbidden")
            cert = await trio.to_thread.run_sync(
                lambda: _direct_tls(env, alpn=["postgresql"], server_name=other, cafile=None)
            )
            assert "localhost" in _names(cert)
            await env.assert_clean()
            assert env.tls_record_layers() == {"c": 1}


async def test_unknown_server_names_make_no_certificate_requests(
    pg: PgCluster, tmp_path: Path
) -> None:
    """Server names the node cannot hold, sent before any identity check, get the file
    certificate without a certificate request to tailscaled (its status is asked once); the
    node's own name still gets its Tailscale certificate."""
    db = create_app_database(pg)
    own = "waypoint.tail1234.ts.net"
    with trio.fail_after(90):
        async with _tailscale_tls_env(pg, tmp_path, db, own) as (env, ts_ca):

            def handshakes() -> list[list[str]]:
                return [
                    _names(
                        _direct_tls(
                            env,
                            alpn=["postgresql"],
                            server_name=f"n{i}.tail1234.ts.net",
                            cafile=None,
                        )
                    )
                    for i in range(40)
                ]

            for names in await trio.to_thread.run_sync(handshakes):
                assert "localhost" in names
            assert env.standin.cert_count() == 0, env.standin.requests
            assert env.standin.status_count() == 1, env.standin.requests
            cert = await trio.to_thread.run_sync(
                lambda: _direct_tls(env, alpn=["postgresql"], server_name=own, cafile=ts_ca)
            )
            assert _names(cert) == [own]
            assert env.standin.cert_count() == 1
            await env.assert_clean()


def _relays_in_c(engine: RelayEngine) -> tuple[int, list[bool]]:
    """How many relays the engine holds, and for each with a TLS client whether its record
    layer runs in the C loop (read from another thread: a snapshot)."""
    relays = list(engine._loop.relays)
    return len(relays), [r.client.tls.in_c and r.client.tls_in_c for r in relays if r.client.tls is not None]


async def test_client_tls_sessions_are_relayed_by_the_engine(pg: PgCluster, tmp_path: Path) -> None:
    """After the handshake, a client-TLS session is handed from trio to the epoll engine (the
    trio stream relay is the fallback for backend TLS only), whose C loop runs its record
    layer, for both negotiations (SSLRequest, direct TLS with ALPN)."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(90):
        async with e2e_env(
            pg, tmp_path, tls_mode="optional", listener_extra=certs.listener_extra()
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            engine = env.running.contexts[LISTENER].engine
            assert engine is not None
            relays = functools.partial(_relays_in_c, engine)
            for negotiation in ("postgres", "direct"):
                dsn = env.dsn(db, sslmode="require", sslnegotiation=negotiation)
                ssl_in_use, during, length = await trio.to_thread.run_sync(
                    tls_session, dsn, relays
                )
                assert ssl_in_use
                assert during == (1, [True])  # the record layer runs in C
                assert length == 20000 * 32
            await env.assert_clean()
            assert env.tls_record_layers() == {"c": 2}


def _revoked_while_idle(dsn: str, engine_relays: Callable[[], tuple[int, list[bool]]], revoke: Callable[[], None]) -> str:
    """A TLS session whose grant is revoked while it is idle: what its next query gets."""
    with psycopg.connect(dsn, connect_timeout=20, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert bool(conn.info.pgconn.ssl_in_use)
        assert engine_relays() == (1, [True])
        revoke()
        try:
            for _ in range(100):  # revalidation runs every second: bounded at 10 s
                conn.execute("select pg_sleep(0.1)")
        except psycopg.OperationalError as exc:
            return f"{exc.diag.severity}: {exc}"
    return "not ended"


async def test_revalidation_ends_a_tls_session_with_its_fatal_inside_tls(pg: PgCluster, tmp_path: Path) -> None:
    """The relay of a TLS client ends on revocation with the FATAL encrypted on the client's
    own session (a FATAL in plaintext would reach libpq as a TLS record error instead)."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(90):
        async with e2e_env(
            pg, tmp_path, tls_mode="optional", listener_extra=certs.listener_extra(),
            revalidation_interval="1s",
        ) as env:  # fmt: skip
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            engine = env.running.contexts[LISTENER].engine
            assert engine is not None

            def revoke() -> None:
                env.grant("127.0.0.1", rules=[db_rule({db: {"permissions": ["readonly"]}}, listener="other")])

            err = await trio.to_thread.run_sync(
                _revoked_while_idle, env.dsn(db, sslmode="require"), functools.partial(_relays_in_c, engine), revoke
            )
            assert "FATAL" in err and "access revoked" in err, err
            await env.assert_clean()
            assert env.tls_record_layers() == {"c": 1}


def _close_notify_session(env: E2EEnv, db: str) -> bytes:
    """A TLS session (SSLRequest) that runs a query, then sends close_notify alone (no
    Terminate) and keeps its socket open: returns what it reads after, until Waypoint closes."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((env.host, env.port), timeout=10)
    raw.sendall(SSL_REQUEST)
    assert raw.recv(1) == b"S"
    tls = ctx.wrap_socket(raw, server_hostname=None)
    session = RawSession(tls)
    tls.sendall(raw_startup_packet({"user": "x", "database": db}))
    while session.read_message()[0] != b"Z":
        pass
    assert session.read_result_of("select v from t") == "ok:one"
    plain = socket.socket(fileno=os.dup(tls.fileno()))  # the TCP stream under the TLS session
    try:
        # Sends close_notify, then waits for the server's: Waypoint answers by closing.
        tls.unwrap()
    except TimeoutError as exc:
        raise AssertionError("Waypoint did not close the connection after close_notify") from exc
    except (ssl.SSLError, OSError):
        pass
    plain.settimeout(10)
    rest = b""
    with plain, tls, contextlib.suppress(ConnectionResetError):
        while chunk := plain.recv(4096):
            rest += chunk
    return rest


async def test_close_notify_is_a_clean_client_end_and_its_backend_ends(pg: PgCluster, tmp_path: Path) -> None:
    """A TLS client that sends close_notify without a Terminate ended its session: the relay
    ends as client_closed (not an error), Waypoint sends it nothing more and closes, and the
    backend is ended by Waypoint's own Terminate."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with capture_logs() as logs, trio.fail_after(90):
        async with e2e_env(pg, tmp_path, tls_mode="require", listener_extra=certs.listener_extra()) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            rest = await trio.to_thread.run_sync(_close_notify_session, env, db)
            assert rest == b""
            await env.assert_clean()
            with trio.fail_after(10):
                while not logs.events("connection_end"):
                    await trio.sleep(0.05)
            [end] = logs.events("connection_end")
            assert (end["outcome"], end["relay_end"], end["tls"]) == ("client_closed", "client_closed", True), end
            assert end["backend_end"] == "terminate", end
            rows = pg.execute(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity"
                " WHERE datname = :d AND starts_with(usename, 'wp_')",
                d=db,
            )
            assert rows[0][0] == 0
            assert env.tls_record_layers() == {"c": 1}


def _pipelined_after_ssl_request(host: str, port: int, db: str) -> bytes:
    ssl_request = struct.pack("!ii", 8, 80877103)
    body = struct.pack("!i", 3 << 16) + b"user\0x\0database\0" + db.encode() + b"\0\0"
    startup = struct.pack("!i", len(body) + 4) + body
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(ssl_request + startup)
        s.settimeout(10)
        received = b""
        while chunk := s.recv(4096):
            received += chunk
        return received


async def test_plaintext_pipelined_after_ssl_request_is_refused(
    pg: PgCluster, tmp_path: Path
) -> None:
    """CVE-2021-23214: bytes sent after SSLRequest, before the server's answer, travelled in
    plaintext; the session closes without answering ``S`` and without a whois."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(60):
        async with e2e_env(
            pg, tmp_path, tls_mode="optional", listener_extra=certs.listener_extra()
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            received = await trio.to_thread.run_sync(
                _pipelined_after_ssl_request, env.host, env.port, db
            )
            assert not received.startswith(b"S")
            assert b"R\x00\x00\x00\x08\x00\x00\x00\x00" not in received  # no AuthenticationOk
            assert not [r for r in env.standin.requests if "whois" in r]
            await env.assert_clean()
