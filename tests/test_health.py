"""``/healthz`` and ``/readyz`` on the metrics listener.

Unit part (``Health`` under trio's MockClock): results are cached briefly, concurrent probes
share one round, a hung check fails at the deadline and is not started again while it hangs,
a drain turns readiness off at once. End to end (PostgreSQL 15 and 18, the LocalAPI stand-in,
a redis-server of the test's own): each check fails alone — LocalAPI gone or hanging, Redis
stopped, a backend down or hanging, the listeners draining — and the endpoint still answers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trio
import trio.testing
from e2e_support import create_app_database, db_rule, e2e_env, make_config_text, run_waypoint
from localapi_standin import LocalAPIStandin
from pgcluster import PgCluster
from state_support import OwnRedis, free_port
from test_metrics import http_get, value

from waypoint.config.load import load_config_text
from waypoint.service.health import Health

# -------------------------------------------------------------------------------- unit


class Counting:
    """A check that counts its calls. With ``hang`` it waits, deaf to cancellation (as a
    blocked worker thread is), until ``released``."""

    def __init__(self) -> None:
        self.calls = 0
        self.hang = False
        self.fail: str | None = None
        self.released = trio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        if self.hang:
            with trio.CancelScope(shield=True):
                await self.released.wait()
        if self.fail:
            raise RuntimeError(self.fail)
        return "fine"


@asynccontextmanager
async def running_health(**checks: Counting) -> AsyncIterator[Health]:
    health = Health(timeout=2.0)
    for name, check in checks.items():
        health.add_check(name, check)
    health.expect_listeners(["pg-main"])
    health.listener_accepting("pg-main", [("127.0.0.1", 5432)])
    async with trio.open_nursery() as nursery:
        await nursery.start(health.run)
        try:
            yield health
        finally:
            for check in checks.values():
                check.released.set()
            nursery.cancel_scope.cancel()


def parse(answer: tuple[int, bytes]) -> tuple[int, dict[str, Any]]:
    status, body = answer
    return status, json.loads(body)


def test_rounds_are_cached_and_shared_by_concurrent_probes() -> None:
    async def main() -> None:
        db = Counting()
        async with running_health(db=db) as health:
            status, doc = parse(await health.ready())
            assert status == 200 and doc["status"] == "ready"
            assert doc["checks"]["db"] == {"ok": True, "detail": "fine"}
            assert doc["checks"]["listeners"]["ok"] is True
            assert db.calls == 1
            # A probe storm: 50 concurrent requests, still one check.
            await trio.sleep(5)
            async with trio.open_nursery() as storm:
                for _ in range(50):
                    storm.start_soon(health.ready)
            assert db.calls == 2
            # Within the cache window: no new check.
            await health.ready()
            assert db.calls == 2
            await trio.sleep(1.5)
            await health.ready()
            assert db.calls == 3

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_hung_check_fails_at_the_deadline_and_is_not_started_again() -> None:
    async def main() -> None:
        ok, hung = Counting(), Counting()
        hung.hang = True
        async with running_health(ok=ok, hung=hung) as health:
            status, doc = parse(await health.ready())
            assert status == 503 and doc["status"] == "not ready"
            assert doc["checks"]["hung"] == {"ok": False, "detail": "no answer within 2s"}
            assert doc["checks"]["ok"]["ok"] is True
            assert doc["checks"]["listeners"]["ok"] is True
            await trio.sleep(5)
            status, doc = parse(await health.ready())
            assert status == 503
            assert doc["checks"]["hung"]["detail"].startswith("still waiting on the previous check")
            assert hung.calls == 1 and ok.calls == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_failing_check_names_its_error_and_drain_is_not_cached() -> None:
    async def main() -> None:
        db = Counting()
        async with running_health(db=db) as health:
            assert (await health.ready())[0] == 200
            health.begin_drain()  # inside the cache window: still 503 at once
            status, doc = parse(await health.ready())
            assert status == 503
            assert doc["checks"]["listeners"] == {
                "ok": False,
                "detail": "draining: not taking new connections",
            }
            assert doc["checks"]["db"]["ok"] is True
            live_status, live = parse(health.live())
            assert live_status == 200 and live["checks"]["process"]["detail"] == "serving; draining"
        db2 = Counting()
        db2.fail = "connection refused"
        async with running_health(db=db2) as health:
            status, doc = parse(await health.ready())
            assert status == 503
            assert doc["checks"]["db"] == {"ok": False, "detail": "connection refused"}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_not_ready_until_every_listener_accepts() -> None:
    async def main() -> None:
        health = Health(timeout=1.0)
        health.expect_listeners(["a", "b"])
        health.listener_accepting("a", [("127.0.0.1", 1)])
        status, doc = parse(await health.ready())
        assert status == 503
        assert doc["checks"]["listeners"]["detail"] == "not accepting yet: b"
        health.listener_accepting("b", [("::1", 2)])
        status, doc = parse(await health.ready())
        assert status == 200
        assert doc["checks"]["listeners"]["detail"] == "accepting: a on 127.0.0.1:1; b on ::1:2"

    trio.run(main)


# -------------------------------------------------------------------------------- end to end

OUTER_BOUND = 30  # generous: the endpoint must answer, whatever hangs behind it


async def readyz(address: tuple[str, int]) -> tuple[int, dict[str, Any]]:
    with trio.fail_after(OUTER_BOUND):
        status, headers, body = await http_get(address, "/readyz")
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


def failing(doc: dict[str, Any]) -> set[str]:
    return {name for name, result in doc["checks"].items() if not result["ok"]}


async def wait_for(address: tuple[str, int], want_failing: set[str]) -> tuple[int, dict[str, Any]]:
    """Poll /readyz until exactly ``want_failing`` fail (bounded)."""
    status, doc = 0, {}
    with trio.move_on_after(60):
        while True:
            status, doc = await readyz(address)
            if failing(doc) == want_failing:
                assert status == (200 if not want_failing else 503), doc
                return status, doc
            await trio.sleep(0.2)
    raise AssertionError(f"/readyz never had exactly {want_failing} failing: {status} {doc}")


def metrics_table(redis_url: str, timeout: str = "1s") -> str:
    return (
        f'[metrics]\nlisten = "127.0.0.1:0"\nreadiness_timeout = "{timeout}"\n\n'
        f'[state]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "wphealth:"\n'
    )


class Tailscaled:
    """The LocalAPI stand-in as a service the test can stop (connections closed, socket
    gone, as when tailscaled exits) and start again on the same path."""

    def __init__(self, nursery: trio.Nursery, path: str) -> None:
        self.nursery = nursery
        self.path = path
        self.scope = trio.CancelScope()
        self.standin = LocalAPIStandin(path)

    async def start(self) -> None:
        self.scope = trio.CancelScope()
        self.standin = LocalAPIStandin(self.path)
        scope, standin = self.scope, self.standin

        async def serve(*, task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await standin.serve(task_status=task_status)

        await self.nursery.start(serve)

    def stop(self) -> None:
        self.scope.cancel()


@pytest.mark.pg
async def test_each_dependency_check_fails_alone_and_recovers(
    pg: PgCluster, tmp_path: Path, own_redis: OwnRedis
) -> None:
    db = create_app_database(pg)
    redis = own_redis
    sock_dir = tempfile.mkdtemp(prefix="wp-health-")
    try:
        async with trio.open_nursery() as nursery:
            tailscaled = Tailscaled(nursery, os.path.join(sock_dir, "tailscaled.sock"))
            await tailscaled.start()
            text = make_config_text(
                pg, socket_path=tailscaled.path, tables_extra=metrics_table(redis.url)
            )
            async with run_waypoint(load_config_text(text, source="health.toml")) as running:
                address = running.metrics_address
                assert address is not None
                everything = {"listeners", "identity", "backend:pg-main", "redis"}
                status, doc = await wait_for(address, set())
                assert set(doc["checks"]) == everything
                assert doc["checks"]["backend:pg-main"]["detail"] == "select 1 on postgres answered"
                assert doc["checks"]["identity"]["detail"] == "tailscaled answered (Running)"
                status, _, body = await http_get(address, "/healthz")
                assert status == 200 and json.loads(body)["status"] == "ok"

                # tailscaled stopped: connections closed, the socket gone.
                tailscaled.stop()
                _, doc = await wait_for(address, {"identity"})
                assert "connect to" in doc["checks"]["identity"]["detail"], doc
                await tailscaled.start()
                await wait_for(address, set())

                # tailscaled hanging: accepts, never answers.
                tailscaled.standin.status_fault = "hang"
                _, doc = await wait_for(address, {"identity"})
                assert "no answer" in doc["checks"]["identity"]["detail"], doc
                tailscaled.standin.status_fault = None
                await wait_for(address, set())

                # tailscaled up but logged out.
                tailscaled.standin.status_extra = {"BackendState": "NeedsLogin"}
                _, doc = await wait_for(address, {"identity"})
                assert (
                    doc["checks"]["identity"]["detail"] == "tailscaled is NeedsLogin, not Running"
                )
                tailscaled.standin.status_extra = {}
                await wait_for(address, set())

                # Redis stopped.
                redis.stop()
                _, doc = await wait_for(address, {"redis"})
                assert doc["checks"]["redis"]["detail"].startswith("Redis did not answer")
                redis.start()
                await wait_for(address, set())

                # Clients are served as usual meanwhile.
                tailscaled.standin.set_peer(
                    "127.0.0.1",
                    login="h@example.com",
                    node="h-pc",
                    rules=[db_rule({db: {"permissions": ["readonly"]}})],
                )
                host, port = running.address("pg-main")
                conn = await trio.to_thread.run_sync(
                    lambda: pg8000.native.Connection(
                        "anyone", host=host, port=port, database=db, timeout=30
                    )
                )
                try:
                    assert await trio.to_thread.run_sync(conn.run, "select 1") == [[1]]
                finally:
                    conn.close()

                _, _, text = await http_get(address, "/metrics")
                assert value(
                    text, "waypoint_readiness_checks_total", check="redis", outcome="failed"
                )
                assert value(text, "waypoint_readiness_checks_total", check="redis", outcome="ok")
            nursery.cancel_scope.cancel()
    finally:
        redis.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[int, list[trio.socket.SocketType]]]:
    """A TCP port that accepts and never answers, and the connections it holds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = int(listener.getsockname()[1])
    held: list[trio.socket.SocketType] = []
    with trio.socket.from_stdlib_socket(listener) as sock:
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                while True:
                    conn, _ = await sock.accept()
                    held.append(conn)

            nursery.start_soon(accept)
            try:
                yield port, held
            finally:
                for conn in held:
                    conn.close()
                nursery.cancel_scope.cancel()


def extra_listener(name: str, cluster: PgCluster, backend_port: int) -> str:
    return f"""
[[listeners]]
name = "{name}"
listen = "127.0.0.1:0"
backend = "127.0.0.1:{backend_port}"
tls_mode = "off"
backend_tls = "disable"

[listeners.postgres]
admin_user = "{cluster.admin_user}"
admin_password = "{cluster.admin_password}"
"""


@pytest.mark.pg
async def test_a_backend_down_or_hanging_fails_its_check_alone(
    pg: PgCluster, tmp_path: Path, own_redis: OwnRedis
) -> None:
    redis = own_redis
    try:
        async with silent_server() as (hung_port, held):
            tables = (
                metrics_table(redis.url)
                + extra_listener("pg-down", pg, free_port())  # nothing listens there
                + extra_listener("pg-hung", pg, hung_port)
            )
            async with e2e_env(pg, tmp_path, tables_extra=tables) as env:
                address = env.running.metrics_address
                assert address is not None
                with trio.fail_after(OUTER_BOUND):
                    status, doc = await readyz(address)
                assert status == 503
                assert failing(doc) == {"backend:pg-down", "backend:pg-hung"}, doc
                assert "failed" in doc["checks"]["backend:pg-down"]["detail"], doc
                assert doc["checks"]["backend:pg-hung"]["detail"] == "no answer within 1s"
                assert doc["checks"]["backend:pg-main"]["ok"] is True
                # Asked again while the hung check still waits: answers, not started again.
                await trio.sleep(1.2)
                status, doc = await readyz(address)
                assert status == 503
                assert doc["checks"]["backend:pg-hung"]["detail"].startswith(
                    "still waiting on the previous check"
                ), doc
                # Let the blocked admin connection fail now rather than at its socket timeout.
                for conn in held:
                    conn.close()
    finally:
        redis.stop()


@pytest.mark.pg
async def test_a_drain_turns_readiness_off_before_listeners_stop_accepting(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    tables = '[metrics]\nlisten = "127.0.0.1:0"\n'
    async with e2e_env(pg, tmp_path, tables_extra=tables, root_extra='drain_delay = "1h"') as env:
        address = env.running.metrics_address
        assert address is not None
        env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
        await wait_for(address, set())
        env.running.shutdown()
        status, doc = await readyz(address)
        assert status == 503
        assert failing(doc) == {"listeners"}
        assert doc["checks"]["listeners"]["detail"] == "draining: not taking new connections"
        # During drain_delay the listener still accepts: balancers move traffic first.
        r = await env.psql("select 42", db)
        assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
        status, _, body = await http_get(address, "/healthz")
        assert status == 200
        assert json.loads(body)["checks"]["process"]["detail"] == "serving; draining"
