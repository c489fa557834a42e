"""Two Waypoint instances sharing Redis state (docs/scaling.md): one user's ``max_conns`` holds across
both, and a CancelRequest sent to instance B cancels a query running through instance A.

Both instances run in this process (``run_waypoint`` twice) in front of one cluster and one
LocalAPI stand-in, with ``[state] backend = "redis"`` and a key prefix unique to the test.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trio
from e2e_support import (
    LISTENER,
    backend_state,
    create_app_database,
    db_rule,
    two_instances,
    wait_running,
)
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster
from state_support import KeySpace

from waypoint.app import Running
from waypoint.pgwire import (
    BackendKeyData,
    ErrorResponse,
    MessageReader,
    build_cancel_request,
    build_message,
    build_startup_message,
    parse_backend_message,
)
from waypoint.state import CancelTarget, cancel_key_digest

# Every test here runs two instances sharing the session's Redis.
pytestmark = pytest.mark.redis



async def connect(running: Running, db: str, source: str) -> pg8000.native.Connection:
    host, port = running.address(LISTENER)

    def go() -> pg8000.native.Connection:
        return pg8000.native.Connection(
            user="anyone",
            host=host,
            port=port,
            database=db,
            source_address=(source, 0),
            timeout=30,
        )

    with trio.fail_after(30):
        return await trio.to_thread.run_sync(go)


def sqlstate(exc: BaseException) -> str | None:
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        return str(exc.args[0].get("C"))
    return None


async def test_max_conns_holds_across_two_instances(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    db = create_app_database(pg)
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, b):
        ip = "127.0.0.2"
        standin.set_peer(
            ip,
            login="carol@example.com",
            node="carol-laptop",
            rules=[db_rule({db: {"permissions": ["readonly"]}}, limits={"max_conns": 2})],
        )
        open_conns: list[pg8000.native.Connection] = []
        try:
            open_conns.append(await connect(a, db, ip))
            open_conns.append(await connect(b, db, ip))
            for conn in open_conns:
                assert await trio.to_thread.run_sync(conn.run, "SELECT v FROM t") == [["one"]]
            for third_via in (a, b):
                with pytest.raises(DatabaseError) as info:
                    open_conns.append(await connect(third_via, db, ip))
                assert sqlstate(info.value) == "53300", info.value
            # A slot freed on one instance is usable through the other.
            await trio.to_thread.run_sync(open_conns.pop(0).close)
            with trio.fail_after(10):
                while True:
                    try:
                        open_conns.append(await connect(b, db, ip))
                        break
                    except DatabaseError as exc:
                        assert sqlstate(exc) == "53300", exc
                        await trio.sleep(0.2)
        finally:
            for conn in open_conns:
                await trio.to_thread.run_sync(conn.close)


class RawClient:
    """Just enough of the frontend protocol to learn the cancel key and run one query."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = MessageReader()
        self.started = False

    async def next(self) -> Any:
        """The next message: parsed when it is a startup-phase one or an ErrorResponse,
        else its type byte (query results are not parsed here)."""
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                if msg.type in (b"T", b"D", b"C", b"I", b"N", b"A", b"S", b"Z") and self.started:
                    return msg.type
                return parse_backend_message(msg)
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("Waypoint closed the connection")
            self.reader.feed(data)

    async def startup(self, db: str) -> BackendKeyData:
        await self.stream.send_all(build_startup_message({"user": "anyone", "database": db}))
        key: BackendKeyData | None = None
        while True:
            msg = await self.next()
            if isinstance(msg, ErrorResponse):
                raise AssertionError(f"login refused: {dict(msg.fields)}")
            if isinstance(msg, BackendKeyData):
                key = msg
            if type(msg).__name__ == "ReadyForQuery":
                self.started = True
                break
        assert key is not None, "no BackendKeyData before ReadyForQuery"
        return key

    async def error(self) -> ErrorResponse:
        """The next ErrorResponse (what comes before it is skipped)."""
        while True:
            msg = await self.next()
            if isinstance(msg, ErrorResponse):
                return msg


@contextlib.asynccontextmanager
async def sleeping_session(
    pg: PgCluster, running: Running, db: str, source: str | None = None
) -> AsyncIterator[tuple[RawClient, BackendKeyData]]:
    """A raw session through ``running`` (from ``source``) whose backend is running
    ``pg_sleep(30)``: its client, and its cancel key."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream(*running.address(LISTENER), local_address=source)
    async with stream:
        client = RawClient(stream)
        with trio.fail_after(30):
            key = await client.startup(db)
        await stream.send_all(build_message(b"Q", b"select pg_sleep(30)\0"))
        await wait_running(pg, key.pid, "pg_sleep")
        yield client, key


async def test_cancel_sent_to_instance_b_cancels_query_running_through_a(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    db = create_app_database(pg)
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, b):
        standin.set_peer(
            "127.0.0.1",
            login="dave@example.com",
            node="dave-laptop",
            rules=[db_rule({db: {"permissions": ["readonly"]}})],
        )
        async with sleeping_session(pg, a, db) as (client, key):
            with trio.fail_after(10):
                cancel = await trio.open_tcp_stream(*b.address(LISTENER))
                async with cancel:
                    await cancel.send_all(build_cancel_request(key.pid, key.secret))
            with trio.fail_after(2):
                msg = await client.error()
            assert msg.sqlstate == "57014", dict(msg.fields)


def cancel_outcome(running: Running, outcome: str) -> float:
    value = running.metrics.registry.get_sample_value(
        "waypoint_cancel_requests_total", {"listener": LISTENER, "outcome": outcome}
    )
    return value or 0.0


async def send_cancel(running: Running, pid: int, secret: bytes, source: str) -> None:
    """A CancelRequest from ``source``; returns once the instance has closed the connection
    (it closes after it has sent the request on, or dropped it)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*running.address(LISTENER), local_address=source)
        async with stream:
            await stream.send_all(build_cancel_request(pid, secret))
            while await stream.receive_some(1024):
                pass


async def test_a_cancel_via_b_from_another_identity_does_not_cancel_the_query_through_a(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    db = create_app_database(pg)
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, b):
        rules = [db_rule({db: {"permissions": ["readonly"]}})]
        standin.set_peer("127.0.0.2", login="erin@example.com", node="erin-pc", rules=rules)
        standin.set_peer("127.0.0.3", login="mallory@example.com", node="mal-pc", rules=rules)
        async with sleeping_session(pg, a, db, "127.0.0.2") as (client, key):
            # The right key, through the other instance, from another identity: nothing.
            await send_cancel(b, key.pid, key.secret, "127.0.0.3")
            state = await trio.to_thread.run_sync(backend_state, pg, key.pid)
            assert state is not None and state[0] == "active", state
            assert cancel_outcome(b, "wrong_identity") == 1.0

            # The owner, through the other instance: cancelled.
            await send_cancel(b, key.pid, key.secret, "127.0.0.2")
            with trio.fail_after(5):
                msg = await client.error()
            assert msg.sqlstate == "57014", dict(msg.fields)
            assert cancel_outcome(b, "forwarded") == 1.0


async def test_a_poisoned_redis_cancel_entry_makes_no_connection_to_its_address(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    """Whoever can write Redis writes a cancel entry naming another host and port (in the old
    bare format and in the current one, with the sender's own identity): no instance connects
    there, and each attempt is counted."""
    db = create_app_database(pg)
    async with two_instances(pg, tmp_path, redis_space) as (standin, _, a, _b):
        standin.set_peer(
            "127.0.0.2",
            login="erin@example.com",
            node="erin-pc",
            rules=[db_rule({db: {"permissions": ["readonly"]}})],
        )
        bait = trio.socket.socket()
        await bait.bind(("127.0.0.1", 0))
        bait.listen(16)
        bait_port = bait.getsockname()[1]
        poisoned = [
            f"127.0.0.1:{bait_port}",
            CancelTarget(LISTENER, ("127.0.0.1", bait_port), "erin@example.com").encode(),
            CancelTarget("elsewhere", ("127.0.0.1", bait_port), "erin@example.com").encode(),
        ]
        client = redis_space.client()
        with bait:
            for i, value in enumerate(poisoned):
                pid, secret = 4000 + i, secrets.token_bytes(4)
                key = f"{redis_space.prefix}cancel:{cancel_key_digest(pid, secret)}"
                client.set(key, value, px=60_000)
                await send_cancel(a, pid, secret, "127.0.0.2")
            # Nothing connected to the bait (every attempt above has finished; wait a bound
            # more for anything late).
            with trio.move_on_after(1.0):
                conn, _ = await bait.accept()
                conn.close()
                raise AssertionError("Waypoint connected to the address in a Redis entry")
        client.close()
        assert cancel_outcome(a, "target_refused") == 3.0
        assert cancel_outcome(a, "forwarded") == 0.0
