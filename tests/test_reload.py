"""Reloading the configuration while serving: a session open on a listener survives a reload
that adds a listener, raises a limit, switches JSON logs on and moves the listener's backend
to another port; the new settings hold for new sessions at once; an invalid file changes
nothing and its one log line names every problem; a removed listener stops accepting and
drains its sessions (ended with a FATAL at ``drain_timeout``); a rotated admin password file
is read at the reload; a TLS setting applies to new connections; a tightened limit ends a
live session at its next revalidation. End to end on PostgreSQL 15 and 18."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trio
from e2e_support import LISTENER, create_app_database, db_rule, make_config_text, run_waypoint
from localapi_standin import LocalAPIStandin, run_standin
from log_support import configured_log
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster
from reload_support import OTHER, close, connect, query, second_listener, wait_until_ended

from waypoint.app import Running
from waypoint.config.load import ConfigError, load_config
from waypoint.service.reload import config_hash

# ------------------------------------------------------------------------------ helpers


class Forwarder:
    """A TCP port that forwards to the cluster: "another backend address" for the same
    cluster; ``ports`` are the client ports of its connections to the cluster (what
    ``inet_client_port()`` answers in a session that came through it)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.ports: set[int] = set()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(*self.target) as server:
            self.ports.add(int(server.socket.getsockname()[1]))

            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await a.receive_some(65536):
                        await b.send_all(data)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await b.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)


def sqlstate(exc: BaseException) -> str | None:
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        return str(exc.args[0].get("C"))
    return None


def metric(running: Running, name: str, **labels: str) -> float | None:
    value = running.metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


@contextlib.asynccontextmanager
async def waypoint_from(path: Path) -> AsyncIterator[Running]:
    async with run_waypoint(load_config(path)) as running:
        yield running


def grant_both(standin: LocalAPIStandin, ip: str, db: str, n: int) -> None:
    rules = [
        db_rule({db: {"permissions": ["readonly"]}}),
        db_rule({db: {"permissions": ["readonly"]}}, listener=OTHER),
    ]
    standin.set_peer(ip, login=f"user{n}@example.com", node=f"node{n}", rules=rules)


# ------------------------------------------------------------------------------ the tests


async def test_live_session_survives_a_reload_that_changes_listeners_limits_logs_and_backend(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    path = tmp_path / "waypoint.toml"
    forwarder = Forwarder((pg.host, pg.port))
    async with run_standin(tmp_path) as standin, trio.open_nursery() as nursery:
        await nursery.start(forwarder.serve)
        base: dict[str, Any] = {"socket_path": standin.socket_path}
        path.write_text(
            make_config_text(pg, **base, tables_extra="[defaults.limits]\nmax_conns_per_user = 1")
        )
        grant_both(standin, "127.0.0.2", db, 2)
        with configured_log() as logs:
            async with waypoint_from(path) as running:
                live = await connect(running, db, "127.0.0.2")
                pid = (await query(live, "select pg_backend_pid()"))[0][0]
                # The limit in force: a second session of the same user is refused.
                with pytest.raises(DatabaseError) as info:
                    await connect(running, db, "127.0.0.2")
                assert sqlstate(info.value) == "53300", info.value
                assert OTHER not in running.addresses
                old_provisioner = running.contexts[LISTENER].provisioner

                path.write_text(
                    make_config_text(
                        pg,
                        **base,
                        backend=f"127.0.0.1:{forwarder.port}",
                        tables_extra='[defaults.limits]\nmax_conns_per_user = 3\n\n[log]\nformat = "json"',
                    )
                    + second_listener(pg)
                )
                assert await running.reload() == "applied"

                # The live session went on, on its own backend process, untouched.
                assert await query(live, "select pg_backend_pid(), v from t") == [[pid, "one"]]
                assert (await query(live, "select inet_client_port()"))[0][0] not in forwarder.ports
                # New sessions: the raised limit, the new backend address (the forwarder).
                more = [await connect(running, db, "127.0.0.2") for _ in range(2)]
                for conn in more:
                    assert await query(conn, "select v from t") == [["one"]]
                    assert (await query(conn, "select inet_client_port()"))[0][0] in forwarder.ports
                assert running.contexts[LISTENER].provisioner is not old_provisioner
                # The added listener serves.
                grant_both(standin, "127.0.0.3", db, 3)
                other = await connect(running, db, "127.0.0.3", listener=OTHER)
                assert await query(other, "select v from t") == [["one"]]
                # The limit is 3 now: a fourth is refused.
                with pytest.raises(DatabaseError) as info:
                    await connect(running, db, "127.0.0.2")
                assert sqlstate(info.value) == "53300", info.value
                assert await query(live, "select 1") == [[1]]
                # Metrics: one applied reload, the info metric names the new file's hash.
                assert metric(running, "waypoint_config_reloads_total", outcome="applied") == 1
                new_hash = config_hash(load_config(path))
                assert metric(running, "waypoint_config_info", hash=new_hash) == 1
                for conn in [live, *more, other]:
                    await close(conn)
            lines = logs.getvalue().splitlines()
        nursery.cancel_scope.cancel()
    # Human lines up to the reload, JSON from then on (the reload's own line included).
    first_json = next(i for i, line in enumerate(lines) if line.startswith("{"))
    assert all(line.startswith("{") for line in lines[first_json:])
    assert all(not line.startswith("{") for line in lines[:first_json])
    assert any("listening" in line for line in lines[:first_json])
    reloaded = [line for line in lines if '"event": "config_reloaded"' in line]
    assert len(reloaded) == 1 and f'"added": ["{OTHER}"]' in reloaded[0], reloaded
    assert '"changed": ["pg-main"]' in reloaded[0]
    assert any('"event": "connection_end"' in line for line in lines[first_json:])


async def test_an_invalid_file_changes_nothing_and_one_line_names_every_problem(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    path = tmp_path / "waypoint.toml"
    async with run_standin(tmp_path) as standin:
        good = make_config_text(pg, socket_path=standin.socket_path)
        path.write_text(good)
        standin.set_peer(
            "127.0.0.2", login="a@example.com", node="a", rules=[db_rule({db: {"permissions": ["readonly"]}})]
        )
        with configured_log() as logs:
            async with waypoint_from(path) as running:
                live = await connect(running, db, "127.0.0.2")
                before_ctx = running.contexts[LISTENER]
                before_addresses = dict(running.addresses)
                before_hash = config_hash(running.config)
                bad = good.replace('drain_timeout = "5s"', 'drain_timeout = "soon"').replace(
                    'tls_mode = "off"', 'tls_mode = "sometimes"'
                ) + '\n[defaults.limits]\nmax_conns_per_user = 3\n\n[[listeners]]\nname = "x"\n'
                path.write_text(bad)
                with pytest.raises(ConfigError) as info:
                    load_config(path)
                problems = info.value.problems
                assert len(problems) >= 3
                assert await running.reload() == "invalid"
                assert running.contexts[LISTENER] is before_ctx
                assert running.addresses == before_addresses
                assert config_hash(running.config) == before_hash
                assert metric(running, "waypoint_config_reloads_total", outcome="invalid") == 1
                assert metric(running, "waypoint_config_reloads_total", outcome="applied") == 0
                assert metric(running, "waypoint_config_info", hash=before_hash) == 1
                assert await query(live, "select v from t") == [["one"]]
                # New sessions still come in under the old settings.
                again = await connect(running, db, "127.0.0.2")
                assert await query(again, "select 1") == [[1]]
                for conn in (live, again):
                    await close(conn)
            text = logs.getvalue()
    failed = [line for line in text.splitlines() if "config_reload_invalid" in line]
    assert len(failed) == 1, text
    for problem in problems:
        assert problem.message in failed[0].replace("\\n", "\n").replace('\\"', '"'), problem


async def test_a_removed_listener_stops_accepting_and_drains_its_sessions(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    path = tmp_path / "waypoint.toml"
    async with run_standin(tmp_path) as standin:
        base = make_config_text(pg, socket_path=standin.socket_path, drain_timeout="2s")
        path.write_text(base + second_listener(pg))
        grant_both(standin, "127.0.0.2", db, 2)
        with configured_log() as logs:
            async with waypoint_from(path) as running:
                kept = await connect(running, db, "127.0.0.2")
                draining = await connect(running, db, "127.0.0.2", listener=OTHER)
                other_address = running.address(OTHER)
                path.write_text(base)
                assert await running.reload() == "applied"
                assert OTHER not in running.addresses and OTHER not in running.contexts
                # Its socket is closed by then: new connections are refused by the kernel.
                with pytest.raises(OSError):
                    with trio.fail_after(10):
                        await trio.open_tcp_stream(*other_address)
                # Its session goes on for now, then is ended at the drain deadline.
                assert await query(draining, "select v from t") == [["one"]]
                await wait_until_ended(draining)
                # The session on the listener that stayed was never touched.
                assert await query(kept, "select v from t") == [["one"]]
                for conn in (kept, draining):
                    await close(conn)
            text = logs.getvalue()
    ends = [line for line in text.splitlines() if "connection_end" in line and OTHER in line]
    assert len(ends) == 1, text
    assert "sqlstate=57P01" in ends[0] and "removed from Waypoint's configuration" in ends[0]
    assert "listener_drain_deadline listener=pg-other sessions=1" in text


async def test_a_rotated_admin_password_file_takes_effect_at_the_reload(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    path = tmp_path / "waypoint.toml"
    secret = tmp_path / "pg_admin"
    secret.write_text(pg.admin_password + "\n")
    secret.chmod(0o600)
    rotated = "rotated-" + pg.admin_password
    async with run_standin(tmp_path) as standin:
        text = make_config_text(pg, socket_path=standin.socket_path).replace(
            f'admin_password = "{pg.admin_password}"', f'admin_password_file = "{secret}"'
        )
        path.write_text(text)
        async with waypoint_from(path) as running:
            standin.set_peer(
                "127.0.0.2", login="a@example.com", node="a", rules=[db_rule({db: {"permissions": ["readonly"]}})]
            )
            first = await connect(running, db, "127.0.0.2")
            old = running.contexts[LISTENER].provisioner
            pg.execute(f"ALTER ROLE {pg.admin_user} PASSWORD '{rotated}'")
            try:
                secret.write_text(rotated + "\n")
                assert await running.reload() == "applied"
                new = running.contexts[LISTENER].provisioner
                assert new is not old
                # A new identity: provisioned through a new admin connection, which only the
                # rotated password opens now.
                standin.set_peer(
                    "127.0.0.3", login="b@example.com", node="b", rules=[db_rule({db: {"permissions": ["readonly"]}})]
                )
                second = await connect(running, db, "127.0.0.3")
                assert await query(second, "select v from t") == [["one"]]
                assert await query(first, "select v from t") == [["one"]]
                for conn in (first, second):
                    await close(conn)
            finally:
                pg.execute(f"ALTER ROLE {pg.admin_user} PASSWORD '{pg.admin_password}'")


def test_the_hash_is_that_of_waypoint_check_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from waypoint.cli.main import main

    path = tmp_path / "w.toml"
    path.write_text(
        re.sub(
            r"\n\s+",
            "\n",
            """
            [[listeners]]
            name = "a"
            listen = "127.0.0.1:6432"
            backend = "${WP_RELOAD_TEST_BACKEND}"
            [listeners.postgres]
            admin_user = "admin"
            admin_password = "s3cret-value"
            """,
        )
    )
    monkeypatch.setenv("WP_RELOAD_TEST_BACKEND", "10.9.8.7:5432")
    assert main(["check", "-c", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "s3cret-value" not in printed and "10.9.8.7" not in printed
    assert config_hash(load_config(path)) == hashlib.sha256(printed.encode()).hexdigest()


async def test_a_tls_setting_applies_to_new_sessions_and_the_live_one_goes_on(
    pg: PgCluster, tmp_path: Path
) -> None:
    import ssl

    from e2e_support import make_cert_files

    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    path = tmp_path / "waypoint.toml"
    async with run_standin(tmp_path) as standin:
        path.write_text(make_config_text(pg, socket_path=standin.socket_path, tls_mode="off"))
        standin.set_peer(
            "127.0.0.2", login="a@example.com", node="a", rules=[db_rule({db: {"permissions": ["readonly"]}})]
        )
        async with waypoint_from(path) as running:
            plain = await connect(running, db, "127.0.0.2")
            path.write_text(
                make_config_text(
                    pg,
                    socket_path=standin.socket_path,
                    tls_mode="require",
                    listener_extra=certs.listener_extra(),
                )
            )
            assert await running.reload() == "applied"
            # New plaintext connections are refused; TLS ones are served.
            with pytest.raises(DatabaseError) as info:
                await connect(running, db, "127.0.0.2")
            assert "TLS is required" in str(info.value)
            tls = ssl.create_default_context(cafile=str(certs.ca_pem))
            host, port = running.address(LISTENER)

            def go() -> pg8000.native.Connection:
                return pg8000.native.Connection(
                    user="anyone", host=host, port=port, database=db,
                    source_address=("127.0.0.2", 0), timeout=30, ssl_context=tls,
                )

            with trio.fail_after(30):
                secure = await trio.to_thread.run_sync(go)
            assert await query(secure, "select v from t") == [["one"]]
            # The plaintext session from before the reload is not touched.
            assert await query(plain, "select v from t") == [["one"]]
            for conn in (plain, secure):
                await close(conn)


async def test_a_tightened_limit_reaches_live_sessions_at_their_next_revalidation(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    path = tmp_path / "waypoint.toml"
    async with run_standin(tmp_path) as standin:

        def text(per_user: int) -> str:
            return make_config_text(
                pg,
                socket_path=standin.socket_path,
                revalidation_interval="1s",
                tables_extra=f"[defaults.limits]\nmax_conns_per_user = {per_user}",
            )

        path.write_text(text(3))
        standin.set_peer(
            "127.0.0.2", login="a@example.com", node="a", rules=[db_rule({db: {"permissions": ["readonly"]}})]
        )
        with configured_log() as logs:
            await _tighten(path, text, db)
        log_text = logs.getvalue()
    over = [line for line in log_text.splitlines() if "session_over_limit" in line]
    assert len(over) == 1 and "limit=1" in over[0], log_text
    assert "sqlstate=53400" in log_text


async def _tighten(path: Path, text: Callable[[int], str], db: str) -> None:
    """Two sessions of one user open under a limit of 3; the reload lowers it to 1."""
    async with waypoint_from(path) as running:
        older = await connect(running, db, "127.0.0.2")
        newer = await connect(running, db, "127.0.0.2")
        path.write_text(text(1))
        assert await running.reload() == "applied"
        # A new session is refused at once (two are open, the limit is one now)...
        with pytest.raises(DatabaseError) as info:
            await connect(running, db, "127.0.0.2")
        assert sqlstate(info.value) == "53300", info.value
        # ...and the next revalidation ends the newer open one; the older one goes on.
        await wait_until_ended(newer)
        assert await query(older, "select v from t") == [["one"]]
        for conn in (older, newer):
            await close(conn)


async def test_a_reassign_to_that_startup_would_refuse_fails_the_reload(
    pg: PgCluster, tmp_path: Path
) -> None:
    import os

    keeper = f"keeper_reload_{os.getpid()}"
    pg.execute(f"CREATE ROLE {keeper} LOGIN")
    path = tmp_path / "waypoint.toml"
    try:
        async with run_standin(tmp_path) as standin:
            path.write_text(make_config_text(pg, socket_path=standin.socket_path))
            with configured_log() as logs:
                async with waypoint_from(path) as running:
                    ctx = running.contexts[LISTENER]
                    path.write_text(
                        make_config_text(
                            pg, socket_path=standin.socket_path, postgres_extra=f'reassign_to = "{keeper}"'
                        )
                    )
                    assert await running.reload() == "failed"
                    assert running.contexts[LISTENER] is ctx
                    assert running.config.listener(LISTENER).postgres.reassign_to is None
                text = logs.getvalue()
        failed = [line for line in text.splitlines() if "config_reload_failed" in line]
        assert len(failed) == 1 and f"role '{keeper}' has LOGIN" in failed[0], text
    finally:
        pg.execute(f"DROP ROLE {keeper}")
