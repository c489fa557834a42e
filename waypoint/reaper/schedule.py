"""When passes run: one at start, then every ``reap_interval``; passes never
overlap (one loop runs them in turn), each is bounded in time, and a failing pass is logged
and retried at the next tick, forever."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import trio

from waypoint.observability.log import get_logger

MIN_PASS_TIMEOUT: Final = 60.0
MAX_PASS_TIMEOUT: Final = 900.0

log = get_logger("reaper")


def default_pass_timeout(interval: float) -> float:
    """How long one pass may take: the interval, clamped to [60 s, 15 min]."""
    return min(max(interval, MIN_PASS_TIMEOUT), MAX_PASS_TIMEOUT)


async def reap_periodically(
    run_pass: Callable[[], Awaitable[object]],
    interval: float,
    *,
    pass_timeout: float | None = None,
    on_error: Callable[[BaseException | None], None] | None = None,
    name: str = "",
) -> NoReturn:
    """Run ``run_pass`` now and then every ``interval`` seconds (measured start to start; a
    pass that overruns its interval is followed at once by the next, never overlapped).

    A pass that raises or exceeds ``pass_timeout`` is logged and reported to ``on_error``
    (with the exception, or None for a timeout); the schedule goes on.
    """
    if interval <= 0:
        raise ValueError("the reap interval must be greater than 0")
    timeout = default_pass_timeout(interval) if pass_timeout is None else pass_timeout
    while True:
        started = trio.current_time()
        with trio.move_on_after(timeout) as scope:
            try:
                await run_pass()
            except Exception as exc:
                log.error("reap_pass_failed", listener=name, error=f"{type(exc).__name__}: {exc}")
                if on_error is not None:
                    on_error(exc)
        if scope.cancelled_caught:
            log.error("reap_pass_timeout", listener=name, timeout=timeout)
            if on_error is not None:
                on_error(None)
        await trio.sleep_until(started + interval)
