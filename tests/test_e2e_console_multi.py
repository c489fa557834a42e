"""The console across two Waypoint instances sharing Redis (PostgreSQL 15 and 18): SHOW SESSIONS
on one lists the other's sessions, KILL and KILL LOGIN on one end sessions held by the other,
LOCK LOGIN on one ends the login's sessions on the other and makes it refuse new ones, and the
lock outlives the instance that set it (a third instance started afterwards lists and enforces
it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from console_support import admin_rule, console_run, sessions_of
from e2e_support import LISTENER, RawSession, create_app_database, run_waypoint, two_instances
from pgcluster import PgCluster
from state_support import KeySpace

from waypoint.app import Running

ADMIN = "admin@example.com"
VICTIM = "victim@example.com"
VICTIM_IP = "127.0.0.2"

# Every test here runs two instances sharing the session's Redis.
pytestmark = pytest.mark.redis


@attrs.frozen
class _At:
    """What RawSession.open needs of an environment: an address."""

    host: str
    port: int


async def _open(running: Running, db: str) -> RawSession:
    host, port = running.address(LISTENER)
    raw = await trio.to_thread.run_sync(lambda: RawSession.open(_At(host, port), db, source=VICTIM_IP))  # type: ignore[arg-type]
    assert (await trio.to_thread.run_sync(raw.read_result_of, "select 1")) == "ok:1"
    return raw


async def _fatal(raw: RawSession) -> dict[str, str]:
    fields = await trio.to_thread.run_sync(lambda: raw.read_until_closed(timeout=10))
    raw.close()
    assert fields.get("S") == "FATAL", fields
    return fields


async def _wait_listed(running: Running, login: str, count: int) -> list[dict[str, Any]]:
    """Poll SHOW SESSIONS on ``running`` (bounded) until ``login`` has ``count`` sessions."""
    with trio.fail_after(15):
        while True:
            found = await sessions_of(running, login)
            if len(found) == count:
                return found
            await trio.sleep(0.1)


async def test_show_kill_and_lock_across_instances(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    db = create_app_database(pg)
    with trio.fail_after(240):
        async with two_instances(pg, tmp_path, redis_space) as (standin, config, a, b):
            standin.set_peer("127.0.0.1", login=ADMIN, node="ops", rules=[admin_rule()])
            standin.set_peer(
                VICTIM_IP,
                login=VICTIM,
                node="victim-box",
                rules=[{"backends": {LISTENER: {"pg": {"databases": {db: {"permissions": ["readonly"]}}}}}}],
            )
            instances = await console_run(a, "SHOW INSTANCES")
            with trio.fail_after(15):
                while len(instances) < 2:
                    await trio.sleep(0.1)
                    instances = await console_run(a, "SHOW INSTANCES")
            assert len({row[0] for row in instances}) == 2

            # SHOW SESSIONS on A lists B's session; KILL on A ends it on B.
            on_b = await _open(b, db)
            [row] = await _wait_listed(a, VICTIM, 1)
            hub_b = b.contexts[LISTENER].console
            assert hub_b is not None and row["instance"] == hub_b.instance_id
            assert row["database"] == db and row["node"] == "victim-box"
            # B's refresh of its sessions' states reaches A (polled, bounded).
            with trio.fail_after(15):
                while row["state"] != "idle":
                    await trio.sleep(0.2)
                    [row] = await _wait_listed(a, VICTIM, 1)
            await console_run(a, f"KILL '{row['conn_id']}'")
            fields = await _fatal(on_b)
            assert fields["C"] == "57P01" and ADMIN in fields["M"]
            await _wait_listed(a, VICTIM, 0)

            # KILL LOGIN on B ends the login's sessions on A and on B.
            sessions = [await _open(a, db), await _open(b, db)]
            await _wait_listed(b, VICTIM, 2)
            await console_run(b, f"KILL LOGIN '{VICTIM}'")
            for raw in sessions:
                fields = await _fatal(raw)
                assert fields["C"] == "57P01" and ADMIN in fields["M"]
            await _wait_listed(b, VICTIM, 0)

            # LOCK on A: B's live session ends, B refuses new ones with the reason.
            on_b = await _open(b, db)
            await console_run(a, f"LOCK LOGIN '{VICTIM}' REASON 'under investigation'")
            fields = await _fatal(on_b)
            assert fields["C"] == "57P01" and "under investigation" in fields["M"]
            for running in (a, b):
                refused = await _refused(running, db)
                assert "28000" in refused and "under investigation" in refused, refused

            # The lock is in Redis: an instance started now lists and enforces it.
            async with run_waypoint(config) as c:
                [lock] = await console_run(c, "SHOW LOCKS")
                assert lock[0] == VICTIM and lock[2] == "under investigation" and ADMIN in lock[3]
                refused = await _refused(c, db)
                assert "28000" in refused
                await console_run(c, f"UNLOCK LOGIN '{VICTIM}'")
            again = await _open(a, db)
            again.close()
            again = await _open(b, db)
            again.close()


async def _refused(running: Running, db: str) -> str:
    """The error RawSession.open raises for a refused login (its text holds the fields)."""
    host, port = running.address(LISTENER)
    try:
        raw = await trio.to_thread.run_sync(lambda: RawSession.open(_At(host, port), db, source=VICTIM_IP))  # type: ignore[arg-type]
    except AssertionError as exc:
        return str(exc)
    raw.close()
    raise AssertionError("not refused")
