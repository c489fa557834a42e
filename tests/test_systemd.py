"""Running under systemd: the unit file passes ``systemd-analyze verify`` and carries its
hardening; the notify protocol, against a fake ``NOTIFY_SOCKET`` (a unix datagram socket of
the test's own, by path and by abstract name) with a real ``waypoint run`` process: READY=1
only once the listeners accept, WATCHDOG=1 pings when WATCHDOG_USEC is set, STOPPING=1 at the
SIGTERM drain, in that order; RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a SIGHUP
reload."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from state_support import free_port

from waypoint.service.notify import Notifier

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "waypoint.service"
ENV_FILE = ROOT / "contrib" / "systemd" / "waypoint.env"
WAYPOINT = Path(sys.executable).with_name("waypoint")


# ------------------------------------------------------------------------------ the unit file


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_is_hardened_notify_and_reloads_with_sighup() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["DynamicUser"] == ["yes"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["PrivateTmp"] == ["yes"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["AmbientCapabilities"] == [""]
    assert "CAP_NET_BIND_SERVICE" in UNIT.read_text()  # documented, commented out
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["LoadCredential"] == ["pg_admin:/etc/waypoint/pg_admin"]
    assert s["BindReadOnlyPaths"] == ["-/run/tailscale"]
    assert s["WatchdogSec"] and s["TimeoutStopSec"]
    assert s["EnvironmentFile"] == ["-/etc/waypoint/waypoint.env"]
    assert s["ExecStart"][0].split()[1:4] == ["run", "-c", "/etc/waypoint/waypoint.toml"]
    env = unit_settings(ENV_FILE.read_text())
    assert env["WAYPOINT_LOG_FORMAT"] == ["json"]


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd); CI installs it")
    # verify checks that ExecStart's program exists: point it at this environment's waypoint.
    unit = tmp_path / "waypoint.service"
    unit.write_text(UNIT.read_text().replace("/opt/waypoint/bin/waypoint", str(WAYPOINT)))
    r = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "waypoint.service" not in r.stderr, r.stderr  # no warning about our unit


# ------------------------------------------------------------------------------ the protocol


@contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's; ``address`` is a path or ``@name``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(30)  # every receive is bounded
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready() is False and n.stopping() is False


def test_messages_by_path_and_abstract_name(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify"), f"@waypoint-test-{uuid.uuid4().hex}"):
        with notify_socket(address) as sock:
            n = Notifier({"NOTIFY_SOCKET": address})
            assert n.ready(status="serving 2\nlisteners") is True
            assert receive(sock) == ["READY=1", "STATUS=serving 2 listeners"]
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert n.reloading()
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            first, second = receive(sock)
            assert first == "RELOADING=1"
            key, _, usec = second.partition("=")
            assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
            assert n.ready()
            assert receive(sock) == ["READY=1"]
            assert n.stopping(status="draining 3 session(s)")
            assert receive(sock) == ["STOPPING=1", "STATUS=draining 3 session(s)"]
            assert n.watchdog()
            assert receive(sock) == ["WATCHDOG=1"]


def test_watchdog_settings_and_a_socket_that_is_gone(tmp_path: Path) -> None:
    gone = str(tmp_path / "gone")
    assert Notifier({"NOTIFY_SOCKET": gone, "WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5
    mine = {"NOTIFY_SOCKET": gone, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 1.5
    other = {**mine, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval is None  # meant for another process
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": gone, "WATCHDOG_USEC": "x"}).watchdog_interval is None
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    # Sending to a socket that is not there fails quietly: the daemon keeps serving.
    assert Notifier({"NOTIFY_SOCKET": gone}).ready() is False


CONFIG = """
drain_timeout = "5s"

[identity]
provider = "static"

[[identity.static]]
cidr = "127.0.0.2/32"
login = "alice@example.com"
node = "alice-laptop"

[metrics]
listen = "127.0.0.1:{metrics}"

[[listeners]]
name = "pg-main"
listen = "127.0.0.1:{port}"
backend = "127.0.0.1:{backend}"
tls_mode = "off"

[listeners.postgres]
admin_user = "waypoint_admin"
admin_password = "unused-here"
"""


class Daemon:
    """``waypoint run`` with NOTIFY_SOCKET (and WATCHDOG_USEC) as systemd would set them."""

    def __init__(
        self, tmp: Path, address: str, watchdog_usec: int | None, port: int | None = None
    ) -> None:
        self.port, self.metrics = port or free_port(), free_port()
        config = tmp / "waypoint.toml"
        config.write_text(CONFIG.format(port=self.port, metrics=self.metrics, backend=free_port()))
        env = {**os.environ, "NOTIFY_SOCKET": address}
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log = (tmp / "waypoint.log").open("w+")
        self.proc = subprocess.Popen(
            [str(WAYPOINT), "run", "-c", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def accepts(self, port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def run_daemon(tmp: Path, address: str, watchdog_usec: int | None) -> list[list[str]]:
    """Start, wait for READY=1 (listeners must accept by then), let it run, SIGTERM, collect
    every message until it exits."""
    with notify_socket(address) as sock:
        daemon = Daemon(tmp, address, watchdog_usec)
        try:
            messages = [receive(sock)]
            assert messages[0][0] == "READY=1", (messages, daemon.output())
            # READY=1 came after the listener and the metrics endpoint were bound.
            assert daemon.accepts(daemon.port) and daemon.accepts(daemon.metrics)
            if watchdog_usec is not None:
                while sum(m == ["WATCHDOG=1"] for m in messages) < 3:
                    messages.append(receive(sock))
                # systemctl reload: SIGHUP must not end it (the loop goes on pinging).
                daemon.proc.send_signal(signal.SIGHUP)
                while sum(m == ["WATCHDOG=1"] for m in messages) < 5:
                    messages.append(receive(sock))
                assert daemon.proc.poll() is None, daemon.output()
            daemon.proc.send_signal(signal.SIGTERM)
            while messages[-1][0] != "STOPPING=1":
                messages.append(receive(sock))
            assert daemon.proc.wait(30) == 0, daemon.output()
            sock.setblocking(False)
            while True:
                try:
                    messages.append(receive(sock))
                except BlockingIOError:
                    break
            return messages
        finally:
            daemon.stop()


def test_waypoint_run_notifies_ready_watchdog_reloading_stopping_in_order(
    tmp_path: Path,
) -> None:
    address = f"@waypoint-test-{uuid.uuid4().hex}"
    messages = run_daemon(tmp_path, address, watchdog_usec=400_000)
    kinds = [m[0] for m in messages]
    assert kinds[0] == "READY=1"
    assert re.fullmatch(r"STATUS=serving 1 listener\(s\)", messages[0][1])
    assert kinds.count("STOPPING=1") == 1
    stop = kinds.index("STOPPING=1")
    # The SIGHUP reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again, nothing between
    # but watchdog pings.
    assert kinds.count("RELOADING=1") == 1 and kinds.count("READY=1") == 2
    reloading = kinds.index("RELOADING=1")
    ready_again = kinds.index("READY=1", 1)
    assert 0 < reloading < ready_again < stop
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", messages[reloading][1])
    assert re.fullmatch(r"STATUS=serving 1 listener\(s\)", messages[ready_again][1])
    assert set(kinds[reloading + 1 : ready_again]) <= {"WATCHDOG=1"}
    others = {"WATCHDOG=1", "RELOADING=1", "READY=1"}
    assert set(kinds[1:stop]) == others
    assert kinds[1:stop].count("WATCHDOG=1") >= 5
    assert messages[stop][1] == "STATUS=draining 0 session(s)"
    # After STOPPING=1 only watchdog pings (the drain keeps the loop alive and pinging).
    assert set(kinds[stop + 1 :]) <= {"WATCHDOG=1"}


def test_no_watchdog_pings_without_watchdog_usec(tmp_path: Path) -> None:
    messages = run_daemon(tmp_path, str(tmp_path / "notify.sock"), watchdog_usec=None)
    assert [m[0] for m in messages] == ["READY=1", "STOPPING=1"]


def test_no_ready_when_a_listener_cannot_be_bound(tmp_path: Path) -> None:
    """READY=1 follows the binding: a listener whose port is taken means exit 1, no READY."""
    address = str(tmp_path / "notify.sock")
    with notify_socket(address) as sock, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        daemon = Daemon(tmp_path, address, None, port=int(taken.getsockname()[1]))
        try:
            daemon.proc.wait(30)
            assert daemon.proc.returncode == 1, daemon.output()
        finally:
            daemon.stop()
        assert "startup_failed" in (tmp_path / "waypoint.log").read_text()
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
