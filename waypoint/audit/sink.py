"""The audit sink: a bounded queue between the relay and one writer thread.

The relay puts the records of a client chunk in the queue *before* it forwards the chunk:
already encoded by the session's C tracker (:meth:`AuditSink.put_encoded`: JSON object
members, one record per line), or as dicts (:meth:`AuditSink.put`, encoded here). The
writer thread chains them (each line gets ``seq`` and ``prev``, the SHA-256 of the line
before it; in C, without the GIL: ``_pump.audit_chain``) and hands them to a
:class:`LineWriter`: a file with size-based rotation (:class:`FileWriter`) or standard
output (:class:`StreamWriter`).

When the writer cannot keep up or fails, the queue fills. ``full`` tells the relay to stop
reading the client (``on_error = "block"``: the session waits, memory stays bounded) or to
end the session (``"close"``). ``failed`` is true from a failed write until the next
successful one; the writer retries the same lines every ``retry_interval`` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import hashlib
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, Protocol

from waypoint.proxy.relay._pump import audit_chain, sha256_bind

from .tracker import CONTEXT_KEY

OnError = Literal["block", "close"]
#: ``prev`` of the first record ever written.
GENESIS: Final = "0" * 64


@functools.cache
def bind_openssl_sha256() -> bool:
    """Hash the chain and oversized texts in C with OpenSSL's SHA-256 (the library
    Python's ``_ssl`` module loaded, found through that module by ctypes; SHA-NI where the
    CPU has it) rather than the extension's portable code. False when not available."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        names = ("SHA256_Init", "SHA256_Update", "SHA256_Final")
        addresses = {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names}
    except (AttributeError, OSError):
        return False
    return sha256_bind(addresses)


def line_hash(line: bytes) -> str:
    """The SHA-256 (hex) of one JSON line, without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class LineWriter(Protocol):
    def last_line(self) -> bytes | None:
        """The last line already written (to continue the chain), or None."""
        ...

    def write(self, lines: list[bytes]) -> None:
        """Write chunks of complete lines (each chunk ends with a newline), in order;
        raise OSError on failure."""
        ...

    def close(self) -> None: ...


class StreamWriter:
    """JSON Lines to a binary stream (standard output by default)."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    def last_line(self) -> bytes | None:
        return None

    def write(self, lines: list[bytes]) -> None:
        self._stream.write(b"".join(lines))
        self._stream.flush()

    def close(self) -> None:
        pass


class FileWriter:
    """JSON Lines appended to ``path``; past ``max_size`` bytes the file is rotated
    (``path.1`` is the newest old file, up to ``path.<keep>``; older ones are deleted).
    The chain runs across rotations: the first line of a new file links to the last
    line of the one before."""

    def __init__(self, path: str | os.PathLike[str], *, max_size: int, keep: int) -> None:
        if max_size < 1024:
            raise ValueError("max_size must be >= 1024 bytes")
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.path = Path(path)
        self.max_size = max_size
        self.keep = keep
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            # Created owner-only; an existing file keeps its mode.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd = fd
            self._size = os.lseek(fd, 0, os.SEEK_END)
        return self._fd

    def last_line(self) -> bytes | None:
        for candidate in [self.path, *(self._rotated(i) for i in range(1, self.keep + 1))]:
            line = _last_line(candidate)
            if line is not None:
                return line
        return None

    def _rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self) -> None:
        self.close()
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._rotated(self.keep).unlink(missing_ok=True)
            for i in range(self.keep - 1, 0, -1):
                if self._rotated(i).exists():
                    self._rotated(i).rename(self._rotated(i + 1))
            if self.path.exists():
                self.path.rename(self._rotated(1))

    def write(self, lines: list[bytes]) -> None:
        batch: list[bytes] = []
        size = self._size if self._fd is not None else _size(self.path)
        rotate = self.path.is_file() or not self.path.exists()  # never rename a device
        if not rotate or size + sum(map(len, lines)) <= self.max_size:
            self._emit(lines)  # the common case: no rotation in this batch
            return
        lines = [line + b"\n" for chunk in lines for line in chunk.split(b"\n")[:-1]]
        for line in lines:
            if rotate and size > 0 and size + len(line) > self.max_size:
                if batch:
                    self._emit(batch)
                    batch = []
                self._rotate()
                size = 0
            batch.append(line)
            size += len(line)
        if batch:
            self._emit(batch)

    def _emit(self, batch: list[bytes]) -> None:
        """Write whole lines, unbuffered. On failure the file is cut back to where the
        batch began (no partial line stays behind; the sink retries the batch)."""
        fd = self._open()
        data = memoryview(b"".join(batch))
        try:
            while data:
                written = os.write(fd, data)
                data = data[written:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)
            self.close()
            raise
        self._size = os.lseek(fd, 0, os.SEEK_END)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _last_line(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            pos = end
            tail = b""
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                stripped = tail.rstrip(b"\n")
                cut = stripped.rfind(b"\n")
                if cut >= 0:
                    return stripped[cut + 1 :] or None
            stripped = tail.rstrip(b"\n")
            return stripped or None
    except FileNotFoundError:
        return None


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


_iso_cache: list[Any] = [None, ""]


def _iso(ts: float) -> str:
    """UTC ISO 8601 with microseconds (the date part is formatted once per second)."""
    second = int(ts)
    if _iso_cache[0] != second:
        stamp = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _iso_cache[0], _iso_cache[1] = second, stamp.strftime("%Y-%m-%dT%H:%M:%S")
    micros = int((ts - second) * 1_000_000)
    return f"{_iso_cache[1]}.{micros:06d}+00:00"


class AuditSink:
    """The bounded queue and its writer thread (see the module docstring)."""

    def __init__(
        self,
        writer: LineWriter,
        *,
        on_error: OnError = "block",
        max_queue: int = 10000,
        retry_interval: float = 1.0,
        flush_interval: float = 0.01,
        on_written: Callable[[int], None] | None = None,
        on_sink_error: Callable[[], None] | None = None,
        log_error: Callable[[str], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        bind_openssl_sha256()
        self.writer = writer
        self.on_error = on_error
        self.max_queue = max_queue
        self.retry_interval = retry_interval
        #: Once a record is queued the writer waits this long for a batch to gather, or
        #: until the queue is a quarter full: records are written in batches, not one
        #: thread hand-off per record. With nothing queued it sleeps until a record comes.
        self.flush_interval = flush_interval
        self._wake_at = max(1, max_queue // 4)
        self._on_written = on_written
        self._on_sink_error = on_sink_error
        self._log_error = log_error
        #: Encoded records (lines of JSON object members) and how many each holds.
        self._queue: deque[tuple[bytes, int]] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: A write failed and has not succeeded since.
        self.failed = False
        #: ``gate[0]`` is 1 while the sink refuses records (``refusing``): what the relay
        #: engine's C loop reads, without the GIL, for sessions with ``on_error = "close"``
        #: (their C trackers hold it: ``AuditTracker.refuse_with``).
        self.gate = bytearray(1)
        self.written = 0
        self.errors = 0
        last = writer.last_line()
        self._prev = GENESIS if last is None else line_hash(last)
        self._seq = 0
        if last is not None:
            try:
                self._seq = int(json.loads(last)["seq"])
            except (ValueError, KeyError, TypeError):
                self._seq = 0

    # -- the relay's side -----------------------------------------------------------------

    @property
    def full(self) -> bool:
        """The queue is at its bound: a blocked session must not read more."""
        return self._queued >= self.max_queue

    @property
    def refusing(self) -> bool:
        """With ``on_error = "close"``: the session must end rather than run unrecorded."""
        return self.failed or self.full

    def put(self, records: Iterable[dict[str, Any]]) -> None:
        """Queue records given as dicts (see :func:`encode_body`)."""
        bodies = [encode_body(record) for record in records]
        if bodies:
            self.put_encoded(b"\n".join(bodies) + b"\n", len(bodies))

    def put_encoded(self, lines: bytes, count: int) -> None:
        """Queue ``count`` encoded records (any thread). The caller checks ``full`` before
        reading what produces them, so the queue exceeds its bound by at most one chunk's
        records."""
        with self._cond:
            first = not self._queue
            self._queue.append((lines, count))
            self._queued += count
            if self._queued >= self.max_queue:
                self.gate[0] = 1
            if first or self._queued >= self._wake_at:
                # The idle writer waits for the first record; then ``flush_interval`` for
                # a batch to gather, unless the queue fills a quarter first.
                self._cond.notify()

    @property
    def queued(self) -> int:
        """Records queued, not yet written."""
        return self._queued

    # -- the writer thread ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="waypoint-audit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by ``timeout``), then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.writer.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()  # woken by the first record or by stop()
                if self._queued < self._wake_at and not self._stopping:
                    self._cond.wait(self.flush_interval)  # let a batch gather
                if not self._queue and self._stopping:
                    return
                batch = list(self._queue)
            count = sum(n for _, n in batch)
            lines, prev, seq = audit_chain(
                self._prev, self._seq, b"".join(chunk for chunk, _ in batch)
            )
            while True:
                try:
                    self.writer.write([lines])
                except Exception as exc:  # OSError, or a writer's own failure
                    self.errors += 1
                    self.gate[0] = 1
                    self.failed = True
                    if self._on_sink_error is not None:
                        self._on_sink_error()
                    if self._log_error is not None:
                        self._log_error(f"{type(exc).__name__}: {exc}")
                    with self._cond:
                        if self._stopping:
                            return
                        self._cond.wait(self.retry_interval)
                    continue
                break
            self.failed = False
            self._prev, self._seq = prev, seq
            with self._cond:
                for _ in range(len(batch)):
                    self._queue.popleft()
                self._queued -= count
                self.gate[0] = self._queued >= self.max_queue
            self.written += count
            if self._on_written is not None:
                self._on_written(count)


def encode_body(record: dict[str, Any]) -> bytes:
    """A record as the members of its JSON line (without ``seq`` and ``prev``): its
    context members (``CONTEXT_KEY``) first, ``time`` (a float) as ISO 8601. What the C
    tracker writes for the same record."""
    ctx = record.get(CONTEXT_KEY)
    if ctx is not None:
        record = dict(record)
        del record[CONTEXT_KEY]
    ts = record.get("time")
    if isinstance(ts, float):
        record = dict(record, time=_iso(ts))
    body = _dumps(record)[1:-1]
    return (f"{ctx},{body}" if ctx and body else ctx or body).encode()


def wait_drained(
    sink: AuditSink, timeout: float, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Poll until the queue is empty (tests, shutdown); False at the bound."""
    end = clock() + timeout
    while sink.queued:
        if clock() >= end:
            return False
        time.sleep(0.01)
    return True
