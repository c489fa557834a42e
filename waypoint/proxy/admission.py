"""Bounds on what a peer can make Waypoint hold or do before its identity is known.

- :class:`HandshakeGate`: connections per source address that have not finished their
  handshake (``[admission] max_handshakes_per_address``).
- :class:`TokenBuckets`: CancelRequests per source address (``cancel_burst`` tokens, one back
  every ``cancel_interval``), in a bounded table.
- :class:`BurstLog`: refusals logged as one line at the start of a burst and one summary line
  (counts by reason, a few sources) per window after it, never one line per packet.
- :class:`AcceptBackoff`: the wait after a transient ``accept()`` error (EMFILE, ENFILE, ...),
  doubling up to a bound.

One :class:`Admission` per app, shared by its listeners.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
import trio

from waypoint.config.model import AdmissionConfig
from waypoint.observability.log import EventLogger, get_logger
from waypoint.observability.metrics import Metrics

Clock = Callable[[], float]

# Source addresses the cancel rate limiter tracks at most; past it, new addresses share one
# bucket (so a peer with many addresses cannot reset its own bucket by churning the table).
MAX_TRACKED_ADDRESSES = 10_000
# Summary window of the burst logs.
BURST_WINDOW = 10.0
# Sources named in one summary line.
BURST_SAMPLE = 5


class TokenBuckets:
    """A token bucket per key (a source address), bounded to ``max_keys`` entries.

    A bucket that has refilled completely is the same as no bucket and is forgotten when the
    table is full; if every tracked bucket is still in use, new keys share one overflow
    bucket."""

    def __init__(
        self,
        burst: int,
        interval: float,
        *,
        max_keys: int = MAX_TRACKED_ADDRESSES,
        clock: Clock = trio.current_time,
    ) -> None:
        if burst <= 0 or interval <= 0 or max_keys <= 0:
            raise ValueError("burst, interval and max_keys must be positive")
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> (tokens, time of that count); insertion order = least recently refilled
        self._buckets: dict[str, tuple[float, float]] = {}
        self._overflow: tuple[float, float] = (float(burst), clock())

    def __len__(self) -> int:
        return len(self._buckets)

    def _refill(self, bucket: tuple[float, float], now: float) -> float:
        tokens, then = bucket
        return min(float(self.burst), tokens + max(0.0, now - then) / self.interval)

    def take(self, key: str) -> bool:
        """Take one token for ``key``; False when its bucket is empty."""
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None and len(self._buckets) >= self.max_keys:
            self._purge(now)
            if len(self._buckets) >= self.max_keys:
                tokens = self._refill(self._overflow, now)
                allowed = tokens >= 1.0
                self._overflow = (tokens - 1.0 if allowed else tokens, now)
                return allowed
        tokens = float(self.burst) if bucket is None else self._refill(bucket, now)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def _purge(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if self._refill(b, now) >= self.burst]
        for key in full:
            del self._buckets[key]


class HandshakeGate:
    """Counts connections per source address that have not finished their handshake.

    The table holds only addresses with at least one such connection, so it is bounded by the
    connections open (which the file-descriptor limit bounds)."""

    def __init__(self, per_address: int) -> None:
        if per_address <= 0:
            raise ValueError("per_address must be positive")
        self.per_address = per_address
        self._pending: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self, address: str) -> int:
        return self._pending.get(address, 0)

    def enter(self, address: str) -> HandshakeTicket | None:
        """A ticket for one more handshake from ``address``, or None at the limit."""
        count = self._pending.get(address, 0)
        if count >= self.per_address:
            return None
        self._pending[address] = count + 1
        return HandshakeTicket(self, address)

    def _leave(self, address: str) -> None:
        count = self._pending.get(address, 0) - 1
        if count > 0:
            self._pending[address] = count
        else:
            self._pending.pop(address, None)


@attrs.define(eq=False)
class HandshakeTicket:
    """One connection's place in the gate; :meth:`release` (idempotent) when its handshake
    ends, by success or by the end of the connection."""

    _gate: HandshakeGate
    _address: str
    _held: bool = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate._leave(self._address)


class BurstLog:
    """One log line for the first event of a burst, then at most one summary line per
    ``window`` with the counts by reason, the number of distinct sources and a few of them."""

    def __init__(
        self,
        log: EventLogger,
        event: str,
        *,
        window: float = BURST_WINDOW,
        sample: int = BURST_SAMPLE,
        clock: Clock = trio.current_time,
    ) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self._log = log
        self.event = event
        self.window = window
        self._sample_size = sample
        self._clock = clock
        self._window_end: float | None = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._sources: set[str] = set()
        self._more_sources = False
        self._opened = trio.Event()

    def record(self, reason: str, source: str, **fields: object) -> None:
        now = self._clock()
        if self._window_end is not None and now >= self._window_end:
            self.flush()
        if self._window_end is None:
            self._log.info(self.event, reason=reason, source=source, count=1, **fields)
            self._window_end = now + self.window
            self._opened.set()
            return
        self._counts[reason] += 1
        if source in self._sources:
            return
        if len(self._sources) < self._sample_size:
            self._sources.add(source)
        else:
            self._more_sources = True

    def flush(self) -> None:
        """Write the summary of what was recorded since the last line (if anything); the
        window closes when nothing was."""
        if not self._counts:
            self._window_end = None
            return
        by_reason = ",".join(f"{r}={n}" for r, n in sorted(self._counts.items()))
        self._log.info(
            self.event,
            reason="summary",
            count=sum(self._counts.values()),
            by_reason=by_reason,
            sources=",".join(sorted(self._sources)) + (",..." if self._more_sources else ""),
            window_s=self.window,
        )
        self._counts.clear()
        self._sources.clear()
        self._more_sources = False
        self._window_end = self._clock() + self.window

    async def run(self) -> None:
        """Flush at the end of each window (a burst's summary appears even if it was the last
        thing that happened)."""
        while True:
            end = self._window_end
            if end is None:
                await self._opened.wait()
                self._opened = trio.Event()
                continue
            await trio.sleep_until(end)
            if self._window_end is not None and self._clock() >= self._window_end:
                self.flush()


class AcceptBackoff:
    """The wait after a transient ``accept()`` failure: ``initial``, doubling per failure in a
    row, at most ``maximum``; :meth:`succeeded` starts over and says how many failed."""

    def __init__(self, initial: float = 0.01, maximum: float = 1.0) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def failed(self) -> float:
        delay: float = min(self.maximum, self.initial * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay

    def succeeded(self) -> int:
        failures, self.failures = self.failures, 0
        return failures


@attrs.define(eq=False)
class Admission:
    """The app's pre-authentication bounds and their burst logs."""

    config: AdmissionConfig
    metrics: Metrics
    clock: Clock = trio.current_time
    handshakes: HandshakeGate = attrs.field(init=False)
    cancel_buckets: TokenBuckets = attrs.field(init=False)
    cancel_log: BurstLog = attrs.field(init=False)
    handshake_log: BurstLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        log = get_logger("admission")
        self.handshakes = HandshakeGate(self.config.max_handshakes_per_address)
        self.cancel_buckets = TokenBuckets(
            self.config.cancel_burst, self.config.cancel_interval, clock=self.clock
        )
        self.cancel_log = BurstLog(log, "cancel_refused", clock=self.clock)
        self.handshake_log = BurstLog(log, "handshake_refused", clock=self.clock)

    async def run(self) -> None:
        """The burst logs' flushes (a background task of the app)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.cancel_log.run)
            nursery.start_soon(self.handshake_log.run)
