"""Console clients for the end-to-end tests: psycopg, pg8000 and pgjdbc against a listener's
console database (``waypoint`` by default)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pg8000.native
import psycopg
import trio

from waypoint.app import Running

CONSOLE_DB = "waypoint"
JAVA_SOURCE = Path(__file__).parent / "java" / "ConsoleQuery.java"
LISTENER = "pg-main"


def admin_rule(level: str = "admin", listener: str = LISTENER) -> dict[str, Any]:
    """A capability rule giving console access (and nothing else) on ``listener``."""
    return {"backends": {listener: {"console": level}}}


#: Debian's pgjdbc (package libpostgresql-jdbc-java, which dev.sh installs).
DEBIAN_PGJDBC_JAR = "/usr/share/java/postgresql.jar"


def _version_key(path: str) -> tuple[int, ...]:
    """A Maven cache jar's version as numbers (``.../42.7.10/...`` after ``.../42.7.9/...``)."""
    version = Path(path).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version))


def pgjdbc_jar() -> str:
    """The pgjdbc jar: Debian's, else ``WAYPOINT_PGJDBC_JAR``, else the newest in the local
    Maven cache."""
    if os.path.isfile(DEBIAN_PGJDBC_JAR):
        return DEBIAN_PGJDBC_JAR
    env = os.environ.get("WAYPOINT_PGJDBC_JAR")
    if env:
        return env
    found = glob.glob(
        os.path.expanduser("~/.m2/repository/org/postgresql/postgresql/*/postgresql-*.jar")
    )
    if not found:
        raise AssertionError(
            f"pgjdbc jar not found: install libpostgresql-jdbc-java ({DEBIAN_PGJDBC_JAR}, "
            "dev.sh does) or set WAYPOINT_PGJDBC_JAR"
        )
    return max(found, key=_version_key)


async def jdbc(host: str, port: int, *statements: str, db: str = CONSOLE_DB) -> list[str]:
    """Run ``statements`` through pgjdbc; the output lines of tests/java/ConsoleQuery.java."""
    url = f"jdbc:postgresql://{host}:{port}/{db}?user=anyone&sslmode=disable&connectTimeout=20"
    cmd = ["java", "-cp", pgjdbc_jar(), str(JAVA_SOURCE), url, *statements]

    def go() -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    r = await trio.to_thread.run_sync(go)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def psycopg_dsn(host: str, port: int, db: str = CONSOLE_DB) -> str:
    return f"host={host} port={port} dbname={db} user=anyone sslmode=disable connect_timeout=20"


async def psycopg_rows(host: str, port: int, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Columns and rows of one console statement over psycopg (extended protocol)."""

    def go() -> tuple[list[str], list[tuple[Any, ...]]]:
        with psycopg.connect(psycopg_dsn(host, port), autocommit=True) as conn:
            cur = conn.execute(sql)
            cols = [d.name for d in cur.description or []]
            return cols, list(cur.fetchall()) if cur.description else []

    return await trio.to_thread.run_sync(go)


async def psycopg_error(host: str, port: int, sql: str) -> psycopg.Error:
    """The error one console statement gets over psycopg (AssertionError if none)."""

    def go() -> psycopg.Error:
        with psycopg.connect(psycopg_dsn(host, port), autocommit=True) as conn:
            try:
                conn.execute(sql)
            except psycopg.Error as exc:
                # The connection stays usable after a console error.
                assert conn.execute("SHOW INSTANCES").fetchall()
                return exc
        raise AssertionError(f"no error for {sql!r}")

    return await trio.to_thread.run_sync(go)


async def console_run(running: Running, sql: str, *, source: str = "127.0.0.1") -> list[list[Any]]:
    """One console statement over pg8000 (extended protocol) from ``source``."""
    host, port = running.address(LISTENER)

    def go() -> list[list[Any]]:
        conn = pg8000.native.Connection(
            user="anyone", host=host, port=port, database=CONSOLE_DB,
            source_address=(source, 0), timeout=30,
        )
        try:
            rows: list[list[Any]] = conn.run(sql) or []
            return rows
        finally:
            conn.close()

    return await trio.to_thread.run_sync(go)


async def sessions_of(running: Running, login: str, *, source: str = "127.0.0.1") -> list[dict[str, Any]]:
    """``SHOW SESSIONS`` rows of ``login`` as dicts."""
    from waypoint.console.parser import COLUMNS

    rows = await console_run(running, "SHOW SESSIONS", source=source)
    out = [dict(zip(COLUMNS["SESSIONS"], row, strict=True)) for row in rows]
    return [r for r in out if r["login"] == login]
