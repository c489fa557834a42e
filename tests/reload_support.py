"""Helpers for the tests around configuration reloads: a second listener's TOML on the same
cluster, and pg8000 sessions through a running Waypoint (bound to a source address, so an
identity of the LocalAPI stand-in), every call bounded."""

from __future__ import annotations

import contextlib
from typing import Any

import pg8000.native
import trio
from e2e_support import LISTENER
from pgcluster import PgCluster

from waypoint.app import Running

#: The second listener's name.
OTHER = "pg-other"


def second_listener(
    cluster: PgCluster, name: str = OTHER, *, password: str | None = None, extra: str = ""
) -> str:
    """A ``[[listeners]]`` table for another listener in front of ``cluster`` (``extra``: more
    of its settings, as TOML lines)."""
    return f"""
[[listeners]]
name = "{name}"
listen = "127.0.0.1:0"
backend = "{cluster.host}:{cluster.port}"
tls_mode = "off"
backend_tls = "disable"
{extra}
[listeners.postgres]
admin_user = "{cluster.admin_user}"
admin_password = "{password or cluster.admin_password}"
"""


async def connect(
    running: Running, db: str, source: str, listener: str = LISTENER
) -> pg8000.native.Connection:
    host, port = running.address(listener)

    def go() -> pg8000.native.Connection:
        return pg8000.native.Connection(
            user="anyone", host=host, port=port, database=db, source_address=(source, 0),
            timeout=30, ssl_context=False,
        )  # fmt: skip

    with trio.fail_after(30):
        return await trio.to_thread.run_sync(go)


async def query(conn: pg8000.native.Connection, sql: str) -> Any:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(conn.run, sql)


async def close(conn: pg8000.native.Connection) -> None:
    with contextlib.suppress(Exception):
        await trio.to_thread.run_sync(conn.close)


async def wait_until_ended(conn: pg8000.native.Connection, timeout: float = 30, poll: float = 0.2) -> None:
    """Query ``conn`` until Waypoint has ended its session. An ended session shows as the
    server's error, as pg8000's "closed" error, or as a reset socket: the client's next query
    can reach a socket Waypoint has already closed, and the kernel answers it with a reset."""
    with trio.fail_after(timeout):
        while True:
            try:
                await query(conn, "select 1")
            except (pg8000.native.DatabaseError, pg8000.native.InterfaceError, OSError):
                return
            await trio.sleep(poll)
