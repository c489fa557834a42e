"""Connections that have not finished their handshake are capped per source address: half-sent
startups from one address cannot take the listener's descriptors while another address still
logs in. On PostgreSQL 15 and 18."""

from __future__ import annotations

import contextlib
from pathlib import Path

import trio
from e2e_support import (
    LISTENER,
    E2EEnv,
    capture_logs,
    create_app_database,
    e2e_env,
    error_fields,
    parse_server_messages,
)
from pgcluster import PgCluster

# The first 6 bytes of a StartupMessage announcing 80 bytes: the server waits for the rest.
HALF_STARTUP = b"\x00\x00\x00\x50\x00\x03"


async def wait_pending(env: E2EEnv, source: str, count: int, timeout: float = 10.0) -> None:
    gate = env.running.contexts[LISTENER].admission.handshakes
    with trio.move_on_after(timeout):
        while gate.pending(source) != count:
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{source} has {gate.pending(source)} handshakes pending, not {count}")


def handshakes_refused(env: E2EEnv) -> float:
    value = env.running.metrics.registry.get_sample_value(
        "waypoint_handshakes_refused_total", {"listener": LISTENER}
    )
    return value or 0.0


async def test_half_open_handshakes_from_one_address_are_capped_while_another_connects(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    with trio.fail_after(60), capture_logs() as logs:
        async with e2e_env(
            pg, tmp_path, tables_extra="[admission]\nmax_handshakes_per_address = 4\n"
        ) as env:
            env.grant("127.0.0.2", {db: {"permissions": ["readonly"]}})
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(4):
                    s = await trio.open_tcp_stream(env.host, env.port, local_address="127.0.0.5")
                    await stack.enter_async_context(s)
                    await s.send_all(HALF_STARTUP)
                await wait_pending(env, "127.0.0.5", 4)

                # The fifth from that address is turned away at once, twice.
                for _ in range(2):
                    extra = await trio.open_tcp_stream(
                        env.host, env.port, local_address="127.0.0.5"
                    )
                    async with extra:
                        got = b""
                        with trio.move_on_after(5):
                            while chunk := await extra.receive_some(4096):
                                got += chunk
                    kinds = parse_server_messages(got)
                    assert kinds and kinds[0][0] == "E", got
                    assert error_fields(kinds[0][1])["C"] == "53300"
                assert handshakes_refused(env) == 2.0

                # Another address logs in and queries meanwhile.
                conn = await env.pg8000_connect(db, source="127.0.0.2")
                try:
                    assert await trio.to_thread.run_sync(conn.run, "SELECT v FROM t") == [["one"]]
                finally:
                    await trio.to_thread.run_sync(conn.close)
                assert env.running.contexts[LISTENER].admission.handshakes.pending("127.0.0.2") == 0
            # The half-open ones closed: the address's count goes back to 0.
            await wait_pending(env, "127.0.0.5", 0)
            refused = logs.events("handshake_refused")
            assert len(refused) == 1, refused  # the second is in the window's summary
            assert refused[0]["source"] == "127.0.0.5" and refused[0]["limit"] == 4
