"""The console across a configuration reload (PostgreSQL 15 and 18): a listener the reload adds
serves its console database, under the name the reloaded file gives it; SHOW SESSIONS there
reads the state of a session on that new listener from its backend; a changed
``console_database`` applies to new connections of a listener that stayed; and KILL from that
listener's console ends the new listener's session and its backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from console_support import admin_rule
from e2e_support import LISTENER, create_app_database, db_rule, make_config_text, run_waypoint
from localapi_standin import run_standin
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster
from reload_support import OTHER, close, connect, query, second_listener, wait_until_ended

from waypoint.app import Running
from waypoint.config.load import load_config
from waypoint.console.parser import COLUMNS

ADMIN = "admin@example.com"
VICTIM = "victim@example.com"


async def _console(running: Running, listener: str, db: str, sql: str) -> list[list[Any]]:
    conn = await connect(running, db, "127.0.0.1", listener)
    try:
        rows: list[list[Any]] = await query(conn, sql) or []
        return rows
    finally:
        await close(conn)


async def _refused(running: Running, listener: str, db: str) -> dict[str, str]:
    try:
        conn = await connect(running, db, "127.0.0.1", listener)
    except DatabaseError as exc:
        return {str(k): str(v) for k, v in exc.args[0].items()}
    await trio.to_thread.run_sync(conn.close)
    raise AssertionError("the connection was not refused")


async def test_a_reload_adds_a_console_and_renames_one(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    path = tmp_path / "waypoint.toml"
    async with run_standin(tmp_path) as standin:
        standin.set_peer(
            "127.0.0.1", login=ADMIN, node="ops-laptop",
            rules=[admin_rule(), admin_rule(listener=OTHER)],
        )
        standin.set_peer(
            "127.0.0.2", login=VICTIM, node="victim-box",
            rules=[db_rule({db: {"permissions": ["readonly"]}}, listener=OTHER)],
        )
        path.write_text(make_config_text(pg, socket_path=standin.socket_path))
        async with run_waypoint(load_config(path)) as running:
            assert len(await _console(running, LISTENER, "waypoint", "SHOW INSTANCES")) == 1

            renamed = make_config_text(
                pg, socket_path=standin.socket_path, listener_extra='console_database = "ctl"'
            )
            path.write_text(renamed + second_listener(pg, extra='console_database = "ops"\n'))
            assert await running.reload() == "applied"

            victim = await connect(running, db, "127.0.0.2", OTHER)
            try:
                assert await query(victim, "select v from t") == [["one"]]
                pid = int((await query(victim, "select pg_catalog.pg_backend_pid()"))[0][0])
                # The added listener's console, under the name the reloaded file gives it; the
                # state column comes from the new listener's backend.
                with trio.fail_after(15):
                    while True:
                        rows = await _console(running, OTHER, "ops", "SHOW SESSIONS")
                        mine = [
                            dict(zip(COLUMNS["SESSIONS"], r, strict=True))
                            for r in rows
                            if r[3] == VICTIM
                        ]
                        if mine and mine[0]["state"] == "idle":
                            break
                        await trio.sleep(0.1)
                assert mine[0]["listener"] == OTHER and mine[0]["database"] == db
                # The listener that stayed: its console under the new name only.
                assert len(await _console(running, LISTENER, "ctl", "SHOW INSTANCES")) == 1
                fields = await _refused(running, LISTENER, "waypoint")
                # The old name is an ordinary database name now: no grant covers it.
                assert fields["C"] == "42501" and 'database "waypoint"' in fields["M"], fields
                # KILL through the renamed console ends the new listener's session and backend.
                await _console(running, LISTENER, "ctl", f"KILL '{mine[0]['conn_id']}'")
                await wait_until_ended(victim, timeout=15, poll=0.1)
                with trio.fail_after(15):
                    while pg.execute("SELECT 1 FROM pg_stat_activity WHERE pid = :p", p=pid):
                        await trio.sleep(0.05)
            finally:
                await close(victim)
