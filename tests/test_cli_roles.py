"""``waypoint roles list|reap`` against throwaway PostgreSQL 15 and 18 (non-superuser admin).

These tests are synchronous: the CLI runs its own ``trio.run``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_reaper_pg
import trio
from pgcluster import PgCluster
from provision_support import role_exists
from test_reaper_pg import (
    ALICE,
    BOB,
    LISTENER,
    expire,
    grant,
    listener_for,
    new_prefix,
)

from waypoint.cli.main import main
from waypoint.grants import naming
from waypoint.grants.model import Preset
from waypoint.identity.model import Identity
from waypoint.provision.engine import Provisioner


def write_config(pg: PgCluster, tmp_path: Path, prefix: str) -> Path:
    path = tmp_path / "waypoint.toml"
    path.write_text(
        f"""
[[listeners]]
name = "{LISTENER}"
listen = "127.0.0.1:0"
backend = "{pg.host}:{pg.port}"
backend_tls = "disable"

[listeners.postgres]
admin_user = "{pg.admin_user}"
admin_password = "{pg.admin_password}"
user_prefix = "{prefix}"
"""
    )
    return path


def provision(pg: PgCluster, prefix: str, db: str, *who: Identity) -> list[str]:
    async def go() -> list[str]:
        prov = Provisioner(listener_for(pg, prefix), handshake_timeout=15.0)
        try:
            roles = []
            for identity in who:
                with trio.fail_after(30):
                    async with prov.credentials(
                        identity, grant(db, (Preset.READONLY, "public"))
                    ) as creds:
                        roles.append(creds.role)
            return roles
        finally:
            await prov.aclose()

    return trio.run(go)


app_db = test_reaper_pg.app_db


def test_roles_reap_dry_run_prints_the_plan_and_changes_nothing(
    pg: PgCluster, app_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = new_prefix()
    alice, bob = provision(pg, prefix, app_db, ALICE, BOB)
    group = naming.group_name(prefix, Preset.READONLY, "public", app_db)
    expire(pg, alice)
    expire(pg, bob)
    config = write_config(pg, tmp_path, prefix)

    assert main(["roles", "reap", "-c", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{LISTENER}: would drop role {alice}" in out
    assert f"{LISTENER}: would drop role {bob}" in out
    assert f"{LISTENER}: would drop group {group}" in out
    assert "(dry run: nothing changed)" in out
    assert role_exists(pg, alice) and role_exists(pg, bob) and role_exists(pg, group)

    assert main(["roles", "reap", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{LISTENER}: dropped role {alice}" in out
    assert f"{LISTENER}: dropped group {group}" in out
    assert "2 role(s) and 1 group(s) dropped, 0 role(s) retired, 0 skipped, 0 failed" in out
    assert not role_exists(pg, alice) and not role_exists(pg, group)


def test_roles_list_shows_identity_database_validity_and_groups(
    pg: PgCluster, app_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = new_prefix()
    (alice,) = provision(pg, prefix, app_db, ALICE)
    group = naming.group_name(prefix, Preset.READONLY, "public", app_db)
    config = write_config(pg, tmp_path, prefix)

    assert main(["roles", "list", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(
        f"listener {LISTENER} (prefix {prefix}, 1 roles (0 retired), 1 groups"
    )
    header = lines[1].split()
    assert header[:4] == ["ROLE", "IDENTITY", "LISTENER", "DATABASE"]
    row = next(line for line in lines if line.startswith(alice + " "))
    assert f"{ALICE.login} on {ALICE.node}" in row
    assert f" {app_db} " in row and f" {LISTENER} " in row
    assert row.split()[-2:] == [group, "-"]  # groups, owns nothing
    assert "(expired)" not in row
    assert any(line.startswith(group) and line.split()[-2:] == ["1", "-"] for line in lines)


def test_roles_reap_retires_an_owner_and_list_shows_what_it_owns(
    pg: PgCluster, app_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = new_prefix()
    (alice,) = provision(pg, prefix, app_db, ALICE)
    # What the caller would have created (a table with a row, a function, a large object).
    pg.execute(f"GRANT CREATE ON SCHEMA public TO {alice}", dbname=app_db)
    pg.execute(
        f"SET ROLE {alice}; CREATE TABLE public.kept_{prefix} (x int); "
        f"INSERT INTO public.kept_{prefix} VALUES (1); "
        f"CREATE FUNCTION public.f_{prefix}() RETURNS int LANGUAGE sql AS 'SELECT 1'; "
        "SELECT lo_from_bytea(0, 'x')",
        dbname=app_db,
    )
    expire(pg, alice)
    config = write_config(pg, tmp_path, prefix)

    assert main(["roles", "reap", "-c", str(config), "--dry-run"]) == 0
    assert f"{LISTENER}: would retire role {alice}" in capsys.readouterr().out
    assert main(["roles", "reap", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{LISTENER}: retired role {alice} (it owns objects; they stay its own)" in out
    assert "0 role(s) and 1 group(s) dropped, 1 role(s) retired" in out

    assert main(["roles", "list", "-c", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "1 roles (1 retired)" in lines[0]
    row = next(line for line in lines if line.startswith(alice + " "))
    assert " retired " in row
    owns = row.split(" - ", 1)[1].strip()  # after the (empty) GROUPS column
    assert owns == f"{app_db}: 1 functions, 1 large objects, 1 relations"
    assert pg.execute(f"SELECT x FROM public.kept_{prefix}", dbname=app_db) == [[1]]


def test_roles_unknown_listener_is_a_usage_error(
    pg: PgCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(pg, tmp_path, new_prefix())
    assert main(["roles", "list", "-c", str(config), "--listener", "nope"]) == 2
    assert "no listener named 'nope'" in capsys.readouterr().err


def test_roles_unreachable_server_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "waypoint.toml"
    path.write_text(
        '[[listeners]]\nname = "x"\nlisten = "127.0.0.1:0"\nbackend = "127.0.0.1:1"\n'
        'backend_tls = "disable"\n[listeners.postgres]\nadmin_user = "a"\nadmin_password = "s3cret"\n'
    )
    assert main(["roles", "reap", "-c", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "x: cannot reach the server" in err
    assert "s3cret" not in err


def test_roles_bad_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "waypoint.toml"
    path.write_text("[[listeners]]\nnmae = 1\n")
    assert main(["roles", "list", "-c", str(path)]) == 2
    assert capsys.readouterr().err
