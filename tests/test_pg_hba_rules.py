"""The ``pg_hba.conf`` lines of docs/admin-privileges.md, applied to PostgreSQL 15 and 18.

A role with the user prefix that set its own password (``ALTER ROLE CURRENT_USER PASSWORD``)
logs in from Waypoint's address and is refused from any other. The regular-expression form
works on 16 and later; on 15 ``/^wp_`` is a literal name, so that form rejects nothing there
(which is why the documentation gives 15 another form).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pg8000.native
import pytest
from pgcluster import SUPERUSER, PgCluster

DOC = Path(__file__).resolve().parent.parent / "docs" / "admin-privileges.md"
WAYPOINT_ADDRESS = "127.0.0.1"
OTHER_ADDRESS = "127.0.0.2"
DOC_ADDRESS = "100.101.102.103/32"

REGEX_FORM = """\
host    all       /^wp_   100.101.102.103/32  scram-sha-256
host    all       /^wp_   all                 reject
local   all       /^wp_                       reject
"""

MEMBERSHIP_FORM = """\
host    all       all            100.101.102.103/32  scram-sha-256
host    all       +direct_login  all                 scram-sha-256
host    all       all            all                 reject
local   all       all                                peer
"""

_names = itertools.count(1)


def test_the_forms_tested_here_are_the_documented_ones() -> None:
    text = DOC.read_text()
    assert REGEX_FORM in text
    assert MEMBERSHIP_FORM in text


def _apply(pg: PgCluster, rules: str) -> None:
    """The harness's unix-socket line for its superuser, the documented lines (Waypoint's
    address substituted), then permissive lines standing for the rest of an operator's file
    (which the documented lines must win over); reload and wait until new connections see
    the file."""
    text = (
        f"local all {SUPERUSER} trust\n"
        + rules.replace(DOC_ADDRESS, f"{WAYPOINT_ADDRESS}/32")
        + "local all all trust\n"
        + "host all all 127.0.0.0/8 scram-sha-256\n"
    )
    pg._write_datadir_file("pg_hba.conf", text)
    errors = pg.execute(
        "SELECT line_number, error FROM pg_catalog.pg_hba_file_rules WHERE error IS NOT NULL"
    )
    assert not errors, errors
    before = pg.execute("SELECT pg_catalog.pg_conf_load_time()")[0][0]
    pg.execute("SELECT pg_catalog.pg_reload_conf()")
    for _ in range(200):  # 10 s at most
        if pg.execute("SELECT pg_catalog.pg_conf_load_time()")[0][0] > before:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not reload pg_hba.conf")


@pytest.fixture
def roles(pg: PgCluster) -> Iterator[tuple[str, str, str]]:
    """(a Waypoint-prefixed role, a direct_login member, their password); pg_hba.conf is
    restored afterwards."""
    n = f"{os.getpid()}_{next(_names)}"
    wp_role, direct = f"wp_hba{n}", f"direct{n}"
    password = f"self-set-{n}"
    pg.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'direct_login') "
        "THEN CREATE ROLE direct_login NOLOGIN; END IF; END $$"
    )
    for role in (wp_role, direct):
        pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD {pg8000.native.literal(password)}")
    pg.execute(f"GRANT direct_login TO {direct}")
    try:
        yield wp_role, direct, password
    finally:
        pg.reload()  # the harness's own pg_hba.conf again
        for role in (wp_role, direct):
            pg.execute(f"DROP ROLE IF EXISTS {role}")


def _login(pg: PgCluster, user: str, password: str, source: str) -> str | None:
    """None when the login works, else the SQLSTATE of the refusal."""
    try:
        conn = pg8000.native.Connection(
            user=user,
            password=password,
            host=pg.host,
            port=pg.port,
            database="postgres",
            source_address=(source, 0),
            timeout=10,
        )
    except pg8000.native.DatabaseError as exc:
        return str(exc.args[0].get("C"))
    conn.close()
    return None


def test_the_membership_form_admits_waypoint_roles_only_from_waypoint(
    pg: PgCluster, roles: tuple[str, str, str]
) -> None:
    wp_role, direct, password = roles
    _apply(pg, MEMBERSHIP_FORM)
    assert _login(pg, wp_role, password, WAYPOINT_ADDRESS) is None
    assert _login(pg, wp_role, password, OTHER_ADDRESS) == "28000"
    assert _login(pg, direct, password, OTHER_ADDRESS) is None


def test_the_regex_form_admits_waypoint_roles_only_from_waypoint_on_16_and_later(
    pg: PgCluster, roles: tuple[str, str, str]
) -> None:
    wp_role, direct, password = roles
    _apply(pg, REGEX_FORM)
    version = int(pg.execute("SHOW server_version_num")[0][0])
    assert _login(pg, wp_role, password, WAYPOINT_ADDRESS) is None
    if version >= 160000:
        assert _login(pg, wp_role, password, OTHER_ADDRESS) == "28000"
    else:  # 15: "/^wp_" is a literal role name there; the documentation says so
        assert _login(pg, wp_role, password, OTHER_ADDRESS) is None
    assert _login(pg, direct, password, OTHER_ADDRESS) is None
