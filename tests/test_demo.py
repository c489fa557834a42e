"""`waypoint demo`: the walkthrough it prints is true (README.md, Quickstart).

The demo runs as a subprocess, exactly as a person would start it; the test reads the printed
walkthrough, runs every printed command and checks each one behaves as the walkthrough says
(``[works]`` or ``[fails: <message>]``), then sends SIGINT and checks the process exits 0 and
its data dir is gone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from waypoint.config.load import load_config_text
from waypoint.demo.walkthrough import LISTENER, LOGIN, NODE, demo_config_text
from waypoint.grants.evaluate import evaluate
from waypoint.grants.model import EffectiveGrant, Preset
from waypoint.identity.static import StaticProvider

STARTUP_TIMEOUT = 180.0  # initdb plus, for the embedded build, copying it, on a busy machine
STEP_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0

_STEP = re.compile(r"^\s+\d+\. (?P<title>.+) \[(?P<expect>works|fails: (?P<message>.+))\]$")


class _Demo:
    """`waypoint demo --port 0` as a subprocess, its stdout collected by a thread."""

    def __init__(self, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "waypoint.cli.main", "demo", "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                self._ready.set()
        self._ready.set()

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line.rstrip("\n"))

    def wait_walkthrough(self) -> str:
        if not self._ready.wait(STARTUP_TIMEOUT) or self.proc.poll() is not None:
            self.kill()
            pytest.fail(
                "the demo printed no walkthrough:\n" + "\n".join(self.out + self.err[-40:])
            )
        return "\n".join(self.out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _field(text: str, label: str) -> str:
    match = re.search(rf"^  {label}:\s+(.+)$", text, flags=re.MULTILINE)
    assert match, f"no {label!r} line in:\n{text}"
    return match.group(1).strip()


def _steps(text: str) -> list[tuple[str, str, str | None, str]]:
    """(title, expect, failure message, command) for each printed step."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        match = _STEP.match(line)
        if match is None:
            continue
        command = lines[i + 1].strip()
        assert command.startswith("$ "), f"step without a command: {line!r}"
        out.append((match["title"], match["expect"], match["message"], command[2:]))
    return out


def _run_step(command: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        command,
        shell=True,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.pg
@pytest.mark.parametrize("postgres", ["system", "embedded"])
def test_demo_walkthrough_behaves_as_printed_and_ctrl_c_cleans_up(postgres: str) -> None:
    demo = _Demo("--postgres", postgres)
    try:
        text = demo.wait_walkthrough()
        data_dir = Path(_field(text, "Data dir"))
        assert data_dir.is_dir()
        assert f"({'embedded' if postgres == 'embedded' else 'system'}:" in _field(
            text, "PostgreSQL"
        )
        if postgres == "embedded":
            assert _field(text, "PostgreSQL").startswith("18.")
        steps = _steps(text)
        commands = [command for _, _, _, command in steps]
        # The walkthrough shows reads and writes (so this test cannot pass on an empty one).
        assert any("dbname=demo " in c and "SELECT" in c for c in commands)
        assert any("dbname=demo " in c and "INSERT" in c and "presets" not in c for c in commands)
        assert any("dbname=reports " in c and "INSERT" in c for c in commands)
        assert any("waypoint.presets=readonly" in c and "INSERT" in c for c in commands)
        for title, expect, message, command in steps:
            result = _run_step(command)
            if expect == "works":
                assert result.returncode == 0, f"{title}: {command}\n{result.stderr}"
            else:
                assert message is not None
                assert result.returncode != 0, f"{title} should fail: {command}\n{result.stdout}"
                assert message in result.stderr, f"{title}: {command}\n{result.stderr}"
        # The INSERT that worked is really there, and the role is Waypoint's, not the admin.
        select = next(c for c in commands if "SELECT c.name" in c)
        assert "coffee" in _run_step(select).stdout
        whoami = next(c for c in commands if "current_user" in c)
        assert "wp_pg_main_demo_example_com_laptop_demo" in _run_step(whoami).stdout

        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(EXIT_TIMEOUT) == 0, "\n".join(demo.err[-40:])
        deadline = time.monotonic() + 5
        while data_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not data_dir.exists(), f"{data_dir} was left behind"
    finally:
        demo.kill()


def test_demo_rejects_a_port_out_of_range() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "waypoint.cli.main", "demo", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--port must be 0..65535" in proc.stderr


def test_demo_config_gives_the_demo_identity_readwrite_on_demo_and_readonly_on_reports() -> None:
    text = demo_config_text(
        listen_port=0,
        backend=("127.0.0.1", 5432),
        admin_user="waypoint_admin",
        admin_password="pa$${word\"'",
    )
    config = load_config_text(text, source="demo.toml")
    assert config.listeners[0].name == LISTENER
    assert config.listeners[0].postgres.admin_password == "pa$${word\"'"
    assert config.identity.provider == "static"
    assert {entry.cidr for entry in config.identity.static} == {"127.0.0.1/32", "::1/128"}
    entry = config.identity.static[0]
    assert (entry.login, entry.node) == (LOGIN, NODE)
    provider = StaticProvider.from_config(config.identity)
    identity = provider.lookup("127.0.0.1")
    assert identity is not None and identity.login == LOGIN
    limits = config.defaults.limits
    demo = evaluate(identity, LISTENER, "demo", admin_database="postgres", defaults=limits, allow_raw_sql=False)
    reports = evaluate(identity, LISTENER, "reports", admin_database="postgres", defaults=limits, allow_raw_sql=False)
    other = evaluate(identity, LISTENER, "postgres", admin_database="postgres", defaults=limits, allow_raw_sql=False)
    assert isinstance(demo, EffectiveGrant) and isinstance(reports, EffectiveGrant)
    assert {p.preset for p in demo.privileges} == {Preset.READWRITE}
    assert {p.preset for p in reports.privileges} == {Preset.READONLY}
    assert not isinstance(other, EffectiveGrant)
