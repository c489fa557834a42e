"""The audit sink (bounded queue, writer thread, rotation), the hash chain and the CLI."""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from waypoint.audit.chain import search, verify
from waypoint.audit.sink import (
    GENESIS,
    AuditSink,
    FileWriter,
    StreamWriter,
    line_hash,
    wait_drained,
)
from waypoint.cli.main import main


def write_records(
    path: Path, n: int, *, max_size: int = 1 << 20, keep: int = 5, start: int = 0
) -> AuditSink:
    sink = AuditSink(FileWriter(path, max_size=max_size, keep=keep))
    sink.start()
    sink.put(
        {
            "event": "query",
            "login": f"user{i % 3}@example.com",
            "node": "laptop",
            "database": "db",
            "text": f"select {i}",
            "time": 1700000000.0 + i,
        }
        for i in range(start, start + n)
    )
    assert wait_drained(sink, 10.0)
    sink.stop()
    return sink


def files_oldest_first(path: Path) -> list[str]:
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [str(p) for p in rotated] + [str(path)]


def test_chain_links_every_record_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 20)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 20
    first = json.loads(lines[0])
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert first["time"].startswith("2023-11-14T22:13:20")
    for before, after in itertools.pairwise(lines):
        assert json.loads(after)["prev"] == line_hash(before)
    report = verify([str(path)])
    assert report.problem is None and report.records == 20
    assert path.stat().st_mode & 0o077 == 0


def test_chain_runs_across_rotations_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 40, max_size=2048, keep=50)
    write_records(path, 40, max_size=2048, keep=50, start=40)  # a restart continues the chain
    files = files_oldest_first(path)
    assert len(files) > 3
    # The first record of each new file links to the last record of the one before.
    for older, newer in itertools.pairwise(files):
        last = Path(older).read_bytes().splitlines()[-1]
        assert json.loads(Path(newer).read_bytes().splitlines()[0])["prev"] == line_hash(last)
    report = verify(files)
    assert report.problem is None and report.records == 80
    # A missing middle file is a missing link.
    broken = verify(files[:1] + files[2:])
    assert broken.problem is not None and broken.problem.file == files[2]


def test_rotation_keeps_only_keep_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 200, max_size=2048, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
    ]


@pytest.mark.parametrize("tamper", ["delete", "reorder", "edit"])
def test_verify_reports_the_first_broken_link(
    tmp_path: Path, tamper: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 10)
    lines = path.read_bytes().splitlines(keepends=True)
    if tamper == "delete":
        del lines[4]
    elif tamper == "reorder":
        lines[4], lines[5] = lines[5], lines[4]
    else:
        lines[4] = lines[4].replace(b"select 4", b"select 5")
    path.write_bytes(b"".join(lines))
    report = verify([str(path)])
    assert report.problem is not None and report.problem.line == 5 + (tamper == "edit")
    assert main(["audit", "verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:{report.problem.line}:" in err and "BROKEN" in err


def test_verify_cli_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 3)
    assert main(["audit", "verify", str(path)]) == 0
    assert "OK: 3 records" in capsys.readouterr().out


def test_search_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    write_records(path, 9)
    got = list(search([str(path)], login="user1@example.com"))
    assert [r["text"] for r in got] == ["select 1", "select 4", "select 7"]
    got = list(search([str(path)], text="SELECT 8"))
    assert [r["seq"] for r in got] == [9]
    assert list(search([str(path)], node="other")) == []
    assert (
        main(
            [
                "audit",
                "search",
                "--login",
                "user2@example.com",
                "--database",
                "db",
                "--since",
                "2023-11-14T22:13:22",
                "--until",
                "2023-11-14T22:13:25+00:00",
                str(path),
            ]
        )
        == 0
    )
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in out] == ["select 2", "select 5"]


def test_stdout_sink_chains_too() -> None:
    buf = io.BytesIO()
    sink = AuditSink(StreamWriter(buf))
    sink.start()
    sink.put([{"event": "query", "text": "a"}, {"event": "query", "text": "b"}])
    assert wait_drained(sink, 10.0)
    sink.stop()
    lines = buf.getvalue().splitlines()
    assert json.loads(lines[1])["prev"] == line_hash(lines[0])


class FlakyWriter:
    """Fails until told to work; counts attempts."""

    def __init__(self) -> None:
        self.ok = threading.Event()
        self.lines: list[bytes] = []
        self.attempts = 0

    def last_line(self) -> bytes | None:
        return None

    def write(self, lines: list[bytes]) -> None:
        self.attempts += 1
        if not self.ok.is_set():
            raise OSError(28, "No space left on device")
        self.lines += [line for chunk in lines for line in chunk.splitlines(keepends=True)]

    def close(self) -> None:
        pass


def test_a_failing_writer_is_retried_and_nothing_is_dropped() -> None:
    writer = FlakyWriter()
    errors: list[Any] = []
    sink = AuditSink(writer, max_queue=3, retry_interval=0.01, log_error=errors.append)
    sink.start()
    sink.put([{"n": i} for i in range(5)])
    assert not wait_drained(sink, 0.3)
    assert sink.failed and sink.full and sink.refusing and sink.errors >= 1
    assert "No space left" in errors[0]
    writer.ok.set()
    assert wait_drained(sink, 10.0)
    assert not sink.failed and sink.written == 5
    assert [json.loads(x)["n"] for x in writer.lines] == [0, 1, 2, 3, 4]
    sink.stop()


def test_the_gate_is_set_exactly_while_the_sink_refuses() -> None:
    """``gate[0]`` (what the relay engine's C loop reads for ``on_error = "close"``) is
    ``refusing``: set once the queue is full or a write failed, clear once written."""
    writer = FlakyWriter()
    sink = AuditSink(writer, on_error="close", max_queue=3, retry_interval=0.01)
    sink.put([{"n": 0}, {"n": 1}])
    assert sink.gate == b"\0" and not sink.refusing
    sink.put([{"n": 2}])
    assert sink.gate == b"\1" and sink.refusing and sink.full
    writer.ok.set()
    sink.start()
    assert wait_drained(sink, 10.0)
    assert sink.gate == b"\0" and not sink.refusing
    writer.ok.clear()
    sink.put([{"n": 3}])
    for _ in range(1000):  # bounded: until the writer tried and failed
        if sink.failed:
            break
        time.sleep(0.01)
    assert sink.failed and not sink.full
    assert sink.gate == b"\1" and sink.refusing
    writer.ok.set()
    assert wait_drained(sink, 10.0)
    assert sink.gate == b"\0" and not sink.refusing
    assert [json.loads(x)["n"] for x in writer.lines] == [0, 1, 2, 3]
    sink.stop()


def test_a_device_that_fails_is_reported_and_never_rotated() -> None:
    writer = FileWriter("/dev/full", max_size=1024, keep=2)
    for _ in range(3):
        with pytest.raises(OSError):
            writer.write([b'{"x":1}\n' * 200])
    writer.close()
    assert Path("/dev/full").exists() and not Path("/dev/full.1").exists()


class _RecordingCondition:
    """A Condition that notes the timeout of every wait (the writer thread's wake-ups)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.timeouts: list[float | None] = []

    def __enter__(self) -> bool:
        return self._cond.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._cond.__exit__(*exc)

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return self._cond.wait(timeout)

    def notify(self) -> None:
        self._cond.notify()


def _until(check: Any, bound: float = 10.0) -> None:
    end = time.monotonic() + bound
    while not check():
        assert time.monotonic() < end, "the writer thread did not get there"
        time.sleep(0.005)


def test_an_idle_writer_sleeps_until_a_record_comes() -> None:
    out = io.BytesIO()
    sink = AuditSink(StreamWriter(out), flush_interval=0.01)
    cond = _RecordingCondition()
    sink._cond = cond  # type: ignore[assignment]
    sink.start()
    try:
        # Idle: one wait, without a timeout (no periodic wake-up with nothing queued).
        _until(lambda: len(cond.timeouts) >= 1)
        assert cond.timeouts == [None]
        # A record wakes it (no quarter-full queue needed) and is written; then it sleeps again.
        sink.put([{"event": "query", "text": "select 1"}])
        assert wait_drained(sink, 10.0)
        _until(lambda: cond.timeouts[-1] is None and len(cond.timeouts) >= 3)
        assert cond.timeouts[1:] == [0.01, None]
        assert b"select 1" in out.getvalue()
    finally:
        sink.stop()
