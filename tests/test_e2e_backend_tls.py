"""Backend TLS: verify-full against the backend's CA, a wrong CA refused (08006),
SCRAM-SHA-256-PLUS required over a TLS backend link (a backend asking for a cleartext password
is refused instead of being handed the role's secret), a certificate that cannot be bound
(Ed25519) failing the login closed unless verify-full, and cancel forwarded over TLS."""

from __future__ import annotations

import io
import json
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pg8000.native
import pytest
import test_logs
import trio
import trustme
from cert_support import KeyType, make_certificate
from e2e_support import LISTENER, E2EEnv, RawSession, create_app_database, e2e_env
from fixtures_pg import PrivatePg
from pgcluster import PgCluster, _HbaEntry

import waypoint.proxy.backend
from waypoint.pgwire import UpstreamLogin

T = TypeVar("T")

json_log = test_logs.json_log  # Waypoint's log as JSON lines into a buffer


def _pg15_ssl_with(key_type: KeyType, private_pg: PrivatePg) -> Iterator[tuple[PgCluster, Path]]:
    """A TLS backend whose server certificate is of ``key_type``, and the CA file that
    verifies it.

    Waypoint's admin connection (pg8000) takes SCRAM-SHA-256-PLUS whenever it is offered, and
    PostgreSQL cannot complete that with an Ed25519 certificate: the admin logs in by ``trust``
    here so that the provisioned roles' own (scram-sha-256) logins are what the tests exercise."""
    with private_pg("system", ssl=True) as cluster:
        cert = make_certificate(key_type, cluster.host)
        cluster._write_datadir_file("server.crt", cert.cert_pem.decode(), 0o644)
        cluster._write_datadir_file("server.key", cert.key_pem.decode(), 0o600)
        cluster._hba_users.append(_HbaEntry("host", cluster.admin_user, "trust"))
        cluster.reload()  # pg_hba.conf, and the TLS files: PostgreSQL reloads them on SIGHUP
        assert cluster.ca_pem_path is not None
        ca = cluster.ca_pem_path.with_name(f"{key_type}-ca.pem")
        ca.write_bytes(cert.ca_pem)
        yield cluster, ca


@pytest.fixture(scope="module")
def pg15_ssl_ed25519(private_pg: PrivatePg) -> Iterator[tuple[PgCluster, Path]]:
    """No channel binding can exist for its certificate; PostgreSQL still offers
    SCRAM-SHA-256-PLUS."""
    yield from _pg15_ssl_with("ed25519", private_pg)


@pytest.fixture(scope="module")
def pg15_ssl_rsa_pss(private_pg: PrivatePg) -> Iterator[tuple[PgCluster, Path]]:
    """Its certificate is signed with RSASSA-PSS (SHA-384 in the signature's parameters)."""
    yield from _pg15_ssl_with("rsa-pss", private_pg)


@pytest.fixture(scope="module")
def pg15_ssl_cleartext(private_pg: PrivatePg) -> Iterator[PgCluster]:
    """A TLS backend whose pg_hba asks every Waypoint role for a cleartext password (the
    admin keeps SCRAM: an admin asked for cleartext over an unverified link is refused
    first, tests/test_admin_auth_fail_closed.py)."""
    with private_pg("system", ssl=True, hba_default_method="password") as cluster:
        cluster._hba_users.append(_HbaEntry("host", cluster.admin_user, "scram-sha-256"))
        cluster.reload()
        yield cluster


def _ssl_in_use(env: E2EEnv, db: str) -> tuple[bool, str]:
    conn = pg8000.native.Connection(
        user="anyone", host=env.host, port=env.port, database=db, ssl_context=False, timeout=20
    )
    try:
        (row,) = conn.run(
            "select s.ssl, current_user from pg_catalog.pg_stat_ssl s "
            "where s.pid = pg_catalog.pg_backend_pid()"
        )
        return bool(row[0]), str(row[1])
    finally:
        conn.close()


def _login_error(env: E2EEnv, db: str) -> dict[str, str]:
    try:
        pg8000.native.Connection(
            user="anyone", host=env.host, port=env.port, database=db, ssl_context=False, timeout=20
        ).close()
    except pg8000.native.DatabaseError as exc:
        return {str(k): str(v) for k, v in exc.args[0].items()}
    raise AssertionError("login through Waypoint unexpectedly succeeded")


def _backend_tls_extra(ca: Path) -> str:
    return f'backend_ca_file = "{ca}"'


async def _through_waypoint(
    cluster: PgCluster,
    tmp_path: Path,
    login: Callable[[E2EEnv, str], T],
    *,
    backend_tls: str,
    listener_extra: str = "",
) -> T:
    """What ``login`` (run in a thread) gets through a Waypoint with ``backend_tls`` in front
    of ``cluster``, logging in to a new database 127.0.0.1 may read; Waypoint ends clean."""
    db = create_app_database(cluster)
    with trio.fail_after(90):
        async with e2e_env(
            cluster, tmp_path, backend_tls=backend_tls, listener_extra=listener_extra
        ) as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            result = await trio.to_thread.run_sync(login, env, db)
            await env.assert_clean()
    return result


async def test_verify_full_against_the_backend_ca(pg15_ssl: PgCluster, tmp_path: Path) -> None:
    assert pg15_ssl.ca_pem_path is not None
    ssl_in_use, user = await _through_waypoint(
        pg15_ssl,
        tmp_path,
        _ssl_in_use,
        backend_tls="verify-full",
        listener_extra=_backend_tls_extra(pg15_ssl.ca_pem_path),
    )
    assert ssl_in_use
    assert user.startswith("wp_pg_main_")


async def test_verify_full_with_a_wrong_ca_is_refused(pg15_ssl: PgCluster, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    fields = await _through_waypoint(
        pg15_ssl,
        tmp_path,
        _login_error,
        backend_tls="verify-full",
        listener_extra=_backend_tls_extra(other_ca),
    )
    assert fields["C"] == "08006", fields
    assert LISTENER in fields["M"]


async def test_cleartext_request_over_tls_is_refused_not_answered(
    pg15_ssl_cleartext: PgCluster, tmp_path: Path
) -> None:
    """A TLS backend (or a man in the middle of an unverified link) that asks for the password
    in cleartext gets nothing: over TLS, Waypoint logs in only with SCRAM-SHA-256-PLUS."""
    fields = await _through_waypoint(
        pg15_ssl_cleartext, tmp_path, _login_error, backend_tls="require"
    )
    assert fields["C"] == "08004", fields
    # The server saw no password at all: its log has no authentication failure for the role
    # and no successful login by it.
    log = pg15_ssl_cleartext.read_log()
    assert "password authentication failed" not in log


def test_postgres_itself_cannot_bind_an_ed25519_certificate(
    pg15_ssl_ed25519: tuple[PgCluster, Path],
) -> None:
    """What PostgreSQL does (be_tls_get_certificate_hash): it offers SCRAM-SHA-256-PLUS, and a
    client that takes it fails, the server finding no digest for the signature."""
    cluster, _ca = pg15_ssl_ed25519
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises(pg8000.native.DatabaseError, match="could not find digest for NID"):
        pg8000.native.Connection(
            user=cluster.superuser,
            password=cluster.superuser_password,
            host=cluster.host,
            port=cluster.port,
            database="postgres",
            ssl_context=context,
            timeout=20,
        ).close()


async def test_ed25519_backend_certificate_fails_the_login_closed(
    pg15_ssl_ed25519: tuple[PgCluster, Path], tmp_path: Path, json_log: io.StringIO
) -> None:
    """No tls-server-end-point hash exists for an Ed25519 certificate: over an unverified link
    the login fails before the role's secret is used, and the log names the algorithm."""
    cluster, _ca = pg15_ssl_ed25519
    fields = await _through_waypoint(cluster, tmp_path, _login_error, backend_tls="require")
    assert fields["C"] == "08004", fields
    logged = json.dumps(test_logs.parse_lines(json_log))
    assert "signed with Ed25519 (1.3.101.112)" in logged
    assert "backend_tls = verify-full" in logged
    assert "password authentication failed" not in cluster.read_log()


async def test_ed25519_backend_certificate_under_verify_full_logs_in_unbound(
    pg15_ssl_ed25519: tuple[PgCluster, Path], tmp_path: Path
) -> None:
    """With the certificate verified (CA and host name), SCRAM runs without channel binding
    against a real server that offers SCRAM-SHA-256-PLUS."""
    cluster, ca = pg15_ssl_ed25519
    ssl_in_use, user = await _through_waypoint(
        cluster,
        tmp_path,
        _ssl_in_use,
        backend_tls="verify-full",
        listener_extra=_backend_tls_extra(ca),
    )
    assert ssl_in_use
    assert user.startswith("wp_pg_main_")


class _RecordingLogin(UpstreamLogin):
    """UpstreamLogin that keeps every instance, to read the method each login used."""

    made: ClassVar[list[UpstreamLogin]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)


async def test_rsa_pss_backend_certificate_binds_as_postgres_does(
    pg15_ssl_rsa_pss: tuple[PgCluster, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The roles log in with SCRAM-SHA-256-PLUS (required over TLS), and PostgreSQL accepts the
    binding: Waypoint hashes an RSASSA-PSS certificate with the hash PostgreSQL uses."""
    cluster, _ca = pg15_ssl_rsa_pss
    monkeypatch.setattr(_RecordingLogin, "made", [])
    monkeypatch.setattr(waypoint.proxy.backend, "UpstreamLogin", _RecordingLogin)
    ssl_in_use, user = await _through_waypoint(
        cluster, tmp_path, _ssl_in_use, backend_tls="require"
    )
    assert ssl_in_use
    assert user.startswith("wp_pg_main_")
    methods = {login.method for login in _RecordingLogin.made if login.authenticated}
    assert methods == {"SCRAM-SHA-256-PLUS"}


async def test_cancel_is_forwarded_over_tls(pg15_ssl: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg15_ssl)
    with trio.fail_after(90):
        async with e2e_env(pg15_ssl, tmp_path, backend_tls="require") as env:
            env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
            raw = await trio.to_thread.run_sync(RawSession.open, env, db)

            def run() -> str:
                raw.send_query("select pg_sleep(30)")
                time.sleep(0.5)
                packet = struct.pack("!iii", 12 + len(raw.secret), 80877102, raw.pid) + raw.secret
                with socket.create_connection((env.host, env.port), timeout=5) as s:
                    s.sendall(packet)
                    s.settimeout(5)
                    while s.recv(1024):
                        pass
                return raw.read_result(timeout=5)

            try:
                result = await trio.to_thread.run_sync(run)
            finally:
                raw.close()
            assert result.startswith("error:57014"), result
            await env.assert_clean()
