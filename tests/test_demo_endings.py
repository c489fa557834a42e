"""`waypoint demo` leaves nothing behind however it ends: its PostgreSQL is stopped and its temp
dir removed after Ctrl-C in a pipeline whose reader dies first, SIGTERM, SIGHUP, its output
losing its reader, an error; and after SIGKILL the next demo stops what was left.

Each demo runs as a subprocess as a person would start it (the system PostgreSQL: the build
does not matter here). What is checked after each ending: the demo's postmaster (read from its
``postmaster.pid`` while it ran) is gone, and so is the demo's temp dir.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from pgcluster import pid_alive

from waypoint.cli import demo as demo_cli
from waypoint.demo.pgrun import postmaster_pid

STARTUP_TIMEOUT = 180.0
END_TIMEOUT = 90.0
DEMO = [sys.executable, "-m", "waypoint.cli.main", "demo", "--port", "0", "--postgres", "system"]

pytestmark = pytest.mark.pg


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class _Lines:
    """Lines read from a stream by a thread, until a line matching ``until`` or EOF; then the
    thread stops reading (and closes the stream when ``close_after``: the reader exits)."""

    def __init__(self, stream: IO[str], until: str | None, *, close_after: bool) -> None:
        self.lines: list[str] = []
        self.done = threading.Event()
        self._stream = stream
        self._until = until
        self._close_after = close_after
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for line in self._stream:
                self.lines.append(line.rstrip("\n"))
                if self._until is not None and line.startswith(self._until):
                    break
        finally:
            self.done.set()
            if self._close_after:
                self._stream.close()

    def text(self) -> str:
        return "\n".join(self.lines)


def _data_dir(text: str) -> Path:
    match = re.search(r"^  Data dir:\s+(.+)$", text, flags=re.MULTILINE)
    assert match, f"no Data dir line in:\n{text}"
    return Path(match.group(1).strip())


def _wait(lines: _Lines, what: str, proc: subprocess.Popen[Any], err: _Lines | None) -> Path:
    if not lines.done.wait(STARTUP_TIMEOUT):
        proc.kill()
        pytest.fail(f"no {what} within {STARTUP_TIMEOUT}s")
    try:
        return _data_dir(lines.text())
    except AssertionError:
        proc.kill()
        raise AssertionError(
            "the demo printed no walkthrough:\n" + "\n".join(err.lines[-40:] if err else [])
        ) from None


def _running_server(root: Path) -> int:
    pid = postmaster_pid(root / "data")
    assert pid is not None and pid_alive(pid), f"no running postmaster in {root}"
    return pid


def _assert_nothing_left(root: Path, pid: int, why: str = "") -> None:
    deadline = time.monotonic() + END_TIMEOUT
    while (root.exists() or pid_alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid), f"the demo's PostgreSQL (pid {pid}) is still running {why}"
    assert not root.exists(), f"{root} was left behind {why}"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    started: list[subprocess.Popen[Any]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _start_demo(procs: list[subprocess.Popen[Any]], **kwargs: Any) -> subprocess.Popen[str]:
    kwargs.setdefault("env", _env())
    proc = subprocess.Popen(DEMO, stdin=subprocess.DEVNULL, text=True, **kwargs)
    procs.append(proc)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_stops_postgres_and_removes_the_data(
    signum: signal.Signals, procs: list[subprocess.Popen[Any]]
) -> None:
    demo = _start_demo(procs, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert demo.stdout is not None and demo.stderr is not None
    err = _Lines(demo.stderr, None, close_after=False)
    out = _Lines(demo.stdout, "Press Ctrl-C", close_after=False)
    root = _wait(out, "walkthrough", demo, err)
    pid = _running_server(root)
    demo.send_signal(signum)
    assert demo.wait(END_TIMEOUT) == 0, "\n".join(err.lines[-40:])
    _assert_nothing_left(root, pid, f"after {signum.name}")


@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout_and_stderr"])
def test_ctrl_c_in_a_pipeline_whose_reader_exits_first(
    stderr_too: bool, procs: list[subprocess.Popen[Any]], tmp_path: Path
) -> None:
    """``waypoint demo | tee log`` (and ``2>&1 | tee log``) and Ctrl-C: the terminal's SIGINT
    reaches the whole foreground process group; tee dies at once, and the demo then writes to
    a pipe nobody reads."""
    demo = _start_demo(
        procs,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE,
        process_group=0,
    )
    tee = subprocess.Popen(
        ["tee", str(tmp_path / "demo.log")],
        stdin=demo.stdout,
        stdout=subprocess.PIPE,
        text=True,
        process_group=demo.pid,
    )
    procs.append(tee)
    assert demo.stdout is not None and tee.stdout is not None
    demo.stdout.close()  # tee is its only reader
    err = None if stderr_too else _Lines(demo.stderr, None, close_after=False)  # type: ignore[arg-type]
    out = _Lines(tee.stdout, "Press Ctrl-C", close_after=False)
    root = _wait(out, "walkthrough through tee", demo, err)
    pid = _running_server(root)
    os.killpg(demo.pid, signal.SIGINT)
    tee.wait(END_TIMEOUT)
    demo.wait(END_TIMEOUT)
    _assert_nothing_left(root, pid, "after Ctrl-C in a pipeline")


@pytest.mark.parametrize("outputs", ["stdout", "stdout_and_stderr"])
def test_output_losing_its_reader_ends_the_demo_cleanly(
    outputs: str, procs: list[subprocess.Popen[Any]]
) -> None:
    """``waypoint demo | head -n 4`` (and with ``2>&1``): the reader exits after four lines;
    the demo notices, ends and cleans up although every later write fails."""
    both = outputs == "stdout_and_stderr"
    demo = _start_demo(
        procs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if both else subprocess.PIPE
    )
    assert demo.stdout is not None
    err = None if both else _Lines(demo.stderr, None, close_after=False)  # type: ignore[arg-type]
    out = _Lines(demo.stdout, "  Data dir:", close_after=True)
    root = _wait(out, "Data dir line", demo, err)
    pid = _running_server(root)
    demo.wait(END_TIMEOUT)
    _assert_nothing_left(root, pid, f"after the reader of {outputs} exited")


def test_after_sigkill_the_next_demo_stops_the_leftover_server(
    procs: list[subprocess.Popen[Any]],
) -> None:
    first = _start_demo(procs, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert first.stdout is not None
    out = _Lines(first.stdout, "Press Ctrl-C", close_after=False)
    root = _wait(out, "walkthrough", first, None)
    pid = _running_server(root)
    first.kill()
    first.wait(10)
    time.sleep(0.5)
    assert root.exists() and pid_alive(pid), "SIGKILL should leave the server behind"

    second = _start_demo(procs, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert second.stdout is not None and second.stderr is not None
    err2 = _Lines(second.stderr, None, close_after=False)
    out2 = _Lines(second.stdout, "Press Ctrl-C", close_after=False)
    root2 = _wait(out2, "second walkthrough", second, err2)
    _assert_nothing_left(root, pid, "by the next demo")
    pid2 = _running_server(root2)
    second.send_signal(signal.SIGINT)
    assert second.wait(END_TIMEOUT) == 0
    _assert_nothing_left(root2, pid2)


def test_an_error_while_serving_still_stops_postgres_and_removes_the_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    async def broken_serve(config: Any, cluster: Any, config_path: Path) -> None:
        seen["root"] = cluster.root
        seen["pid"] = _running_server(cluster.root)
        raise RuntimeError("something broke while serving")

    monkeypatch.setattr(demo_cli, "_serve", broken_serve)
    args = argparse.Namespace(port=0, postgres="system", log_format="human")
    with pytest.raises(RuntimeError, match="something broke"):
        demo_cli.run(args)
    _assert_nothing_left(seen["root"], seen["pid"], "after an error")


def _processes_under(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (a server started for a data dir there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_setting_up_leaves_nothing(
    signum: signal.Signals, procs: list[subprocess.Popen[Any]]
) -> None:
    """A signal while initdb / the server start / the sample data run (a temp dir of its own,
    so what another run leaves cannot be mistaken for this one's)."""
    tmp = Path(tempfile.mkdtemp(prefix="wp-demo-setup-"))
    os.chmod(tmp, 0o755)  # the postgres OS user traverses it when we are root
    try:
        demo = _start_demo(
            procs,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**_env(), "TMPDIR": str(tmp)},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not list(tmp.glob("waypoint-demo-*/data")) and time.monotonic() < deadline:
            assert demo.poll() is None, "the demo ended before it set anything up"
            time.sleep(0.02)
        assert list(tmp.glob("waypoint-demo-*/data")), "the demo never started initdb"
        demo.send_signal(signum)
        assert demo.wait(END_TIMEOUT) != 0  # interrupted, not a normal end
        deadline = time.monotonic() + END_TIMEOUT
        while _processes_under(tmp) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_under(tmp), "a server of the interrupted demo is still running"
        assert not list(tmp.glob("waypoint-demo-*")), "the interrupted demo left its temp dir"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
