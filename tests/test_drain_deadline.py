"""The drain deadline, in-process on trio's MockClock (time moves only when the test moves it):
a session still open when the drain begins keeps working until ``drain_timeout`` has passed,
not a moment less, and is ended with FATAL 57P01 then; the log says the deadline ended it
(``drain_deadline`` with ``reason=timeout``), not a second signal."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from e2e_support import RawSession, capture_logs, create_app_database, db_rule, e2e_env
from pgcluster import PgCluster

DRAIN_TIMEOUT = 10.0


async def _query(raw: RawSession, sql: str) -> str:
    return await trio.to_thread.run_sync(lambda: raw.read_result_of(sql, timeout=20))


async def test_a_session_works_until_the_drain_deadline_and_is_ended_at_it(
    pg15: PgCluster, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db = create_app_database(pg15)
    with capture_logs() as logs:
        async with e2e_env(pg15, tmp_path, drain_timeout=f"{DRAIN_TIMEOUT:g}s") as env:
            env.grant("127.0.0.1", rules=[db_rule({db: {"permissions": ["readonly"]}})])
            raw = await trio.to_thread.run_sync(lambda: RawSession.open(env, db))
            try:
                assert await _query(raw, "select 1") == "ok:1"
                env.running.shutdown()
                # The drain runs until it waits for the sessions: nothing else blocks it (no
                # drain_delay, no pooled backend), so its deadline is now + drain_timeout.
                await trio.testing.wait_all_tasks_blocked()
                assert logs.events("shutdown_begin") == [
                    {"sessions": 1, "drain_timeout": DRAIN_TIMEOUT}
                ]
                mock_clock.jump(DRAIN_TIMEOUT - 0.01)
                assert await _query(raw, "select 2") == "ok:2"
                await trio.testing.wait_all_tasks_blocked()
                assert logs.events("drain_deadline") == []
                mock_clock.jump(0.02)
                err = await trio.to_thread.run_sync(lambda: raw.read_until_closed(timeout=20))
                assert err.get("S") == "FATAL" and err.get("C") == "57P01", err
            finally:
                raw.close()
    # Waypoint has stopped: every session has logged its end.
    assert logs.events("drain_deadline") == [{"sessions": 1, "reason": "timeout"}]
    ended = [e for e in logs.events("connection_end") if e.get("db") == db]
    assert len(ended) == 1, ended
    assert ended[0]["outcome"] == "ended" and ended[0]["sqlstate"] == "57P01", ended
    assert "drain deadline" in ended[0]["detail"], ended
