"""Tests of the throwaway-cluster harness itself (tests/pgcluster.py, tests/fixtures_pg.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pg8000.native
import psycopg
import pytest
from fixtures_pg import PrivatePg
from pgcluster import PgCluster, PgClusterError, Version, pid_alive, reap_orphans

from waypoint.demo import pgrun


def _login(cluster: PgCluster, user: str, password: str | None) -> str:
    """Log in over TCP with pg8000 and return current_user."""
    conn = pg8000.native.Connection(
        user=user,
        password=password,
        host=cluster.host,
        port=cluster.port,
        database="postgres",
        timeout=10,
    )
    try:
        return str(conn.run("SELECT current_user")[0][0])
    finally:
        conn.close()


def _wait_gone(pid: int) -> bool:
    """Whether the process is gone within 5 s."""
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


def test_both_versions_start_and_report_their_major(pg15: PgCluster, pg18: PgCluster) -> None:
    assert pg18.version == 18
    assert pg15.version >= 13
    assert (
        pg15.psql("SELECT current_setting('server_version_num')")
        .strip()
        .startswith(str(pg15.version))
    )
    assert pg18.psql("SHOW server_version").startswith("18.")


def test_superuser_logs_in_over_tcp_with_its_password_only(pg: PgCluster) -> None:
    assert _login(pg, pg.superuser, pg.superuser_password) == "postgres"
    with pytest.raises(pg8000.native.DatabaseError) as info:
        _login(pg, pg.superuser, "not-the-password")
    assert info.value.args[0]["C"] == "28P01"


def test_admin_is_not_superuser_and_has_createrole(pg: PgCluster) -> None:
    rows = pg.execute(
        "SELECT rolsuper, rolcreaterole, rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = :n",
        n=pg.admin_user,
    )
    assert rows == [[False, True, True]]
    assert _login(pg, pg.admin_user, pg.admin_password) == pg.admin_user


def test_md5_user_needs_the_right_password(pg: PgCluster) -> None:
    pg.add_user("md5_user", "md5-secret", "md5")
    stored = pg.execute("SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = 'md5_user'")[
        0
    ][0]
    assert stored.startswith("md5")
    assert _login(pg, "md5_user", "md5-secret") == "md5_user"
    with pytest.raises(pg8000.native.DatabaseError) as info:
        _login(pg, "md5_user", "wrong")
    assert info.value.args[0]["C"] == "28P01"


def test_trust_user_logs_in_without_password(pg: PgCluster) -> None:
    pg.add_user("trust_user", None, "trust")
    assert _login(pg, "trust_user", None) == "trust_user"


def test_cleartext_password_user_needs_the_right_password(pg: PgCluster) -> None:
    pg.add_user("clear_user", "clear-secret", "password")
    assert _login(pg, "clear_user", "clear-secret") == "clear_user"
    with pytest.raises(pg8000.native.DatabaseError):
        _login(pg, "clear_user", "wrong")


def test_generic_rule_is_scram_for_roles_without_their_own_line(pg: PgCluster) -> None:
    pg.add_user("scram_user", "scram-secret", "scram-sha-256")
    assert _login(pg, "scram_user", "scram-secret") == "scram_user"
    # A role Waypoint would provision: no hba line of its own. With an MD5 verifier stored,
    # the generic scram-sha-256 rule cannot authenticate it, which shows the rule is SCRAM.
    pg.execute("SET password_encryption = 'md5'; CREATE ROLE generic_md5 LOGIN PASSWORD 'x1'")
    with pytest.raises(pg8000.native.DatabaseError) as info:
        _login(pg, "generic_md5", "x1")
    assert info.value.args[0]["C"] == "28P01"


def test_add_user_rejects_unusable_input(pg15: PgCluster) -> None:
    with pytest.raises(PgClusterError, match="needs a password"):
        pg15.add_user("nopw", None, "md5")
    with pytest.raises(PgClusterError, match="not usable in pg_hba"):
        pg15.add_user('bad"name', "pw", "md5")
    with pytest.raises(PgClusterError, match="hostssl user needs"):
        pg15.add_user("tls_only", "pw", "scram-sha-256", connection="hostssl")


def test_hostssl_user_is_refused_without_tls(pg15_ssl: PgCluster) -> None:
    pg15_ssl.add_user("tls_user", "tls-secret", "scram-sha-256", connection="hostssl")
    ca = str(pg15_ssl.ca_pem_path)
    with psycopg.connect(
        pg15_ssl.dsn(user="tls_user", password="tls-secret", sslmode="verify-full", sslrootcert=ca),
        connect_timeout=10,
    ) as conn:
        assert conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match=r"no encryption|SSL off"):
        psycopg.connect(
            pg15_ssl.dsn(user="tls_user", password="tls-secret", sslmode="disable"),
            connect_timeout=10,
        )


def test_psql_raises_with_the_server_error(pg: PgCluster) -> None:
    assert pg.psql("SELECT 1 + 1").strip() == "2"
    with pytest.raises(PgClusterError, match="no_such_table"):
        pg.psql("SELECT * FROM no_such_table")


def test_pg_db_is_a_fresh_database(pg: PgCluster, pg_db: str) -> None:
    pg.execute("CREATE TABLE t (x int)", dbname=pg_db)
    assert pg.execute("SELECT current_database()", dbname=pg_db) == [[pg_db]]


@pytest.mark.pg
def test_ssl_with_embedded_18_is_a_clear_error() -> None:
    with pytest.raises(PgClusterError, match="no SSL support"):
        PgCluster.start("18", ssl=True)


@pytest.mark.pg
@pytest.mark.parametrize("version", ["system", "18"])
def test_stop_leaves_no_process_and_no_directory(version: str) -> None:
    with PgCluster.start(
        version,  # type: ignore[arg-type]
        log_statement="all",
        settings={"work_mem": "7MB"},
        max_connections=50,
    ) as cluster:
        assert cluster.execute("SHOW work_mem") == [["7MB"]]
        assert cluster.execute("SHOW max_connections") == [["50"]]
        cluster.execute("SELECT 'log-marker-42'")
        log = cluster.read_log()
        assert "log-marker-42" in log
        assert cluster.superuser_password not in log
        assert cluster.admin_password not in log
        pid, root = cluster.postmaster_pid, cluster.root
        assert pid is not None and pid_alive(pid)
    assert not cluster.running
    assert cluster.postmaster_pid is None
    assert not root.exists()
    assert _wait_gone(pid)
    cluster.stop()  # idempotent


@pytest.mark.parametrize("version", ["system", "18"])
def test_clusters_of_one_build_are_copies_of_one_initdb(
    version: Version, private_pg: PrivatePg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """initdb runs at most once per build and process (the template); each cluster is a copy of
    its own: what one cluster holds, the other does not."""
    calls: list[object] = []
    real = pgrun.initdb

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        real(*args, **kwargs)

    monkeypatch.setattr(pgrun, "initdb", counting)
    with private_pg(version) as a, private_pg(version) as b:
        assert len(calls) <= 1, calls  # none when this build's template was made before
        assert a.datadir != b.datadir and a.port != b.port
        a.execute("CREATE DATABASE only_in_a")
        assert b.execute("SELECT count(*) FROM pg_database WHERE datname = 'only_in_a'") == [[0]]
    with private_pg(version) as c:
        assert c.execute("SELECT count(*) FROM pg_database WHERE datname = 'only_in_a'") == [[0]]
    assert len(calls) <= 1, calls


@pytest.mark.pg
def test_cluster_of_a_killed_process_is_reaped() -> None:
    tests_dir = Path(__file__).parent
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(tests_dir)!r})
        from pgcluster import PgCluster
        c = PgCluster.start("system")
        print(c.root, int((c.datadir / "postmaster.pid").read_text().split()[0]), flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        root_text, pid_text = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    root, pid = Path(root_text), int(pid_text)
    assert root.exists() and pid_alive(pid)
    assert root in reap_orphans()
    assert not root.exists()
    assert _wait_gone(pid)
