"""Reload of a real ``waypoint run`` process: SIGHUPs (sent directly and by ``waypoint reload
-c FILE`` through the pid file) during a burst of concurrent connections lose no connection;
the service manager sees RELOADING=1 (with MONOTONIC_USEC) then READY=1 around each reload
on a fake NOTIFY_SOCKET; ``waypoint reload`` refuses an invalid file without signalling."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pg8000.native
import pytest
from e2e_support import StaticPeer, create_app_database, db_rule, make_static_config_text
from pgcluster import PgCluster
from state_support import free_port

WAYPOINT = Path(sys.executable).with_name("waypoint")


def _config(
    cluster: PgCluster, db: str, pid_file: Path, port: int, metrics: int, total: int
) -> str:
    peer = StaticPeer("127.0.0.1/32", "burst@example.com", "burst-node", [db_rule({db: {"permissions": ["readonly"]}})])
    text = make_static_config_text(
        cluster,
        [peer],
        tables_extra=f'[defaults.limits]\nmax_conns_total = {total}\n\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n',
    )
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    # The role TTL too ([listeners.postgres] is the last table): each reload gives the
    # listener a new provisioner while connections of the previous one are mid-handshake.
    ttl = "1d" if total % 2 else "2d"
    return f'pid_file = "{pid_file}"\n' + text + f'user_ttl = "{ttl}"\n'


def _write(path: Path, text: str) -> None:
    """Replace the file at once: the daemon never reads half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def _burst(port: int, db: str, count: int, workers: int, done: threading.Event) -> list[str]:
    """``count`` connects (each runs a query and closes), ``workers`` at a time; the failures."""
    failures: list[str] = []

    def one(_: int) -> None:
        try:
            conn = pg8000.native.Connection(
                user="x", host="127.0.0.1", port=port, database=db, timeout=30, ssl_context=False
            )
            try:
                assert conn.run("select v from t") == [["one"]]
            finally:
                conn.close()
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(count)))
    finally:
        done.set()
    return failures


def _sighup_during_burst(cluster: PgCluster, tmp_path: Path, count: int) -> None:
    db = create_app_database(cluster)
    metrics, port = free_port(), free_port()
    pid_file = tmp_path / "waypoint.pid"
    path = tmp_path / "waypoint.toml"
    _write(path, _config(cluster, db, pid_file, port, metrics, 1000))
    address = f"@waypoint-test-{uuid.uuid4().hex}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + address[1:])
    notify.settimeout(30)
    log = (tmp_path / "waypoint.log").open("w+")
    env = {**os.environ, "NOTIFY_SOCKET": address}
    env.pop("WATCHDOG_USEC", None)
    proc = subprocess.Popen(
        [str(WAYPOINT), "run", "-c", str(path)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read()

    try:
        messages = [_receive(notify)]
        assert messages[0][0] == "READY=1", (messages, output())
        assert pid_file.read_text().strip() == str(proc.pid)

        # Read the notify socket all along (the daemon never blocks on it: a full queue drops).
        stop_reading = threading.Event()

        def read_notify() -> None:
            notify.settimeout(0.2)
            while not stop_reading.is_set():
                with contextlib.suppress(TimeoutError):
                    messages.append(_receive(notify))

        reader = threading.Thread(target=read_notify, daemon=True)
        reader.start()
        done = threading.Event()
        signals = 0
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as runner:
                result = runner.submit(_burst, port, db, count, 16, done)
                total = 1000
                while not done.is_set():
                    # 1001, 1002, ...: whichever write a reload reads (signals that arrive
                    # before it runs make one reload), its settings differ from the running ones.
                    total += 1
                    _write(path, _config(cluster, db, pid_file, port, metrics, total))
                    if signals % 20 != 5:
                        proc.send_signal(signal.SIGHUP)
                    else:
                        r = subprocess.run(
                            [str(WAYPOINT), "reload", "-c", str(path)],
                            capture_output=True, text=True, timeout=60, check=False,
                        )
                        assert r.returncode == 0, r.stderr
                    signals += 1
                    time.sleep(0.02)
                failures = result.result(timeout=300)
            assert failures == [], (failures[:5], len(failures), output())
            assert signals >= 6, signals  # the sixth through ``waypoint reload``
            # Every reload's RELOADING=1 is followed by its READY=1; wait for the last one.
            deadline = time.monotonic() + 30
            while not (
                messages[-1][0] == "READY=1"
                and output().count("config_reloaded") == [m[0] for m in messages].count("RELOADING=1")
            ):
                assert time.monotonic() < deadline, (messages[-3:], output()[-3000:])
                time.sleep(0.1)
        finally:
            stop_reading.set()
            reader.join(10)
        kinds = [m[0] for m in messages]
        assert kinds[0] == "READY=1"
        for i, kind in enumerate(kinds[1:], start=1):
            expected = "RELOADING=1" if i % 2 else "READY=1"
            assert kind == expected, messages
            if kind == "RELOADING=1":
                assert re.fullmatch(r"MONOTONIC_USEC=\d+", messages[i][1]), messages[i]
        reloads = kinds.count("RELOADING=1")
        # Signals that arrive during a reload make one more, not one each.
        assert 1 <= reloads <= signals
        text = output()
        assert text.count("config_reloaded") == reloads
        assert "config_reload_invalid" not in text and "config_reload_failed" not in text
        # The reloads replaced the listener's context (and its provisioner) under the burst.
        assert "changed=['pg-main']" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert f'waypoint_config_reloads_total{{outcome="applied"}} {float(reloads)}' in body
        assert 'waypoint_config_reloads_total{outcome="invalid"} 0.0' in body
        assert len(re.findall(r"^waypoint_config_info\{hash=\"[0-9a-f]{64}\"\} 1\.0$", body, re.M)) == 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, output()
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        notify.close()


def test_sighup_during_a_connection_burst_loses_no_connection(pg: PgCluster, tmp_path: Path) -> None:
    _sighup_during_burst(pg, tmp_path, count=300)


@pytest.mark.slow
def test_sighup_during_a_long_connection_burst_loses_no_connection(
    pg: PgCluster, tmp_path: Path
) -> None:
    _sighup_during_burst(pg, tmp_path, count=3000)


def test_waypoint_reload_refuses_an_invalid_file_and_signals_through_the_pid_file(
    tmp_path: Path,
) -> None:
    """A stand-in daemon (``sleep``, which SIGHUP ends) shows whether a signal was sent."""
    pid_file = tmp_path / "w.pid"
    path = tmp_path / "w.toml"
    valid = (
        f'pid_file = "{pid_file}"\n[[listeners]]\nname = "a"\nlisten = "127.0.0.1:6432"\n'
        'backend = "127.0.0.1:5432"\n[listeners.postgres]\nadmin_user = "a"\nadmin_password = "p"\n'
    )
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        pid_file.write_text(f"{sleeper.pid}\n")
        path.write_text('drain_timeout = "soon"\n' + valid.replace("name = ", 'tls_mode = "sometimes"\nname = '))
        r = subprocess.run(
            [str(WAYPOINT), "reload", "-c", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 1
        assert "listeners[0].tls_mode" in r.stderr and "drain_timeout" in r.stderr, r.stderr
        assert "2 problems, not reloaded" in r.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None  # not signalled
        path.write_text(valid)
        r = subprocess.run(
            [str(WAYPOINT), "reload", "-c", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 0, r.stderr
        assert sleeper.wait(10) == -signal.SIGHUP
        # Now nothing runs under that pid: a clear error, exit 1.
        r = subprocess.run(
            [str(WAYPOINT), "reload", "-c", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 1 and "no process" in r.stderr, r.stderr
        # Without pid_file: told how to find the daemon.
        path.write_text(valid.replace(f'pid_file = "{pid_file}"\n', ""))
        r = subprocess.run(
            [str(WAYPOINT), "reload", "-c", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 1 and "no pid_file is set" in r.stderr, r.stderr
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(10)


def test_waypoint_run_takes_the_log_format_and_level_from_the_file(tmp_path: Path) -> None:
    """``[log] format`` wins over ``--log-format``; ``[log] level`` drops the lines below it."""
    port = free_port()
    path = tmp_path / "w.toml"
    path.write_text(
        '[log]\nformat = "json"\nlevel = "warning"\n\n[identity]\nprovider = "static"\n\n'
        '[[identity.static]]\ncidr = "127.0.0.9/32"\nlogin = "n@example.com"\nnode = "n"\n\n'
        f'[[listeners]]\nname = "a"\nlisten = "127.0.0.1:{port}"\nbackend = "127.0.0.1:{free_port()}"\n'
        'tls_mode = "off"\n[listeners.postgres]\nadmin_user = "a"\nadmin_password = "p"\n'
    )
    log = (tmp_path / "w.log").open("w+")
    proc = subprocess.Popen(
        [str(WAYPOINT), "run", "-c", str(path), "--log-format", "human"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        # A warning: a SIGHUP for a file that no longer validates (an error line, in JSON).
        path.write_text(path.read_text() + "bogus = 1\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "config_reload_invalid" not in (tmp_path / "w.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "w.log").read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    lines = (tmp_path / "w.log").read_text().splitlines()
    assert lines and all(line.startswith("{") for line in lines), lines
    assert not any('"level": "info"' in line for line in lines), lines
    assert any('"event": "config_reload_invalid"' in line for line in lines)
