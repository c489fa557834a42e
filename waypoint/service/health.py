"""``/healthz`` and ``/readyz`` for the metrics endpoint: liveness and readiness.

Liveness (``/healthz``) is the event loop answering: 200 while the process serves, draining
included (a restart would not help a drain).

Readiness (``/readyz``) is 200 only when every check passes:

- ``listeners``: every listener's sockets are bound and its accept loop runs, and no drain
  has begun (a drain turns it off *before* the listeners stop accepting);
- ``identity``: tailscaled's LocalAPI answered ``GET /localapi/v0/status`` within the
  identity timeout and is running (the static provider has nothing to ask);
- ``backend:<listener>``: the listener's admin pool ran ``select 1`` on its admin database;
- ``redis``: Redis answered a PING, when ``[state] backend = "redis"``.

The dependency checks run concurrently, each under ``[metrics] readiness_timeout``, in tasks
of :meth:`Health.run` (not of the request): a request waits for the round at most that long,
and a check without an answer by then fails as "no answer within ...". A check still running
from an earlier round (a hung dependency, a blocked worker thread) is not started again; it
fails as "still waiting". A finished round is reused for :data:`CACHE_FOR` seconds, and
concurrent requests share one round, so a probe storm costs at most one LocalAPI call, one
``select 1`` per backend and one PING per second. The ``listeners`` check is evaluated on
every request, never cached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from waypoint.observability.log import get_logger
from waypoint.observability.metrics import Metrics
from waypoint.provision.admin import AdminPools, AdminSession

__all__ = [
    "CACHE_FOR",
    "CheckResult",
    "Health",
    "SupportsPing",
    "backend_check",
    "identity_check",
]

log = get_logger("health")

#: How long a finished round of dependency checks answers later requests.
CACHE_FOR = 1.0

#: A dependency check: returns a short detail when healthy, raises when not.
Check = Callable[[], Awaitable[str]]


@attrs.frozen
class CheckResult:
    ok: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@runtime_checkable
class SupportsPing(Protocol):
    async def ping(self) -> None: ...


@attrs.define(eq=False)
class _Round:
    started: float
    results: dict[str, CheckResult] = attrs.field(factory=dict)
    done: trio.Event = attrs.field(factory=trio.Event)
    finished_at: float | None = None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "…"


class Health:
    """Readiness state and checks of one running app."""

    def __init__(
        self,
        *,
        timeout: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,
        cache_for: float = CACHE_FOR,
    ) -> None:
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"readiness timeout must be positive, not {timeout!r}")
        self.timeout = timeout
        self._metrics = metrics
        self._clock = clock or trio.current_time
        self._cache_for = cache_for
        self._checks: dict[str, Check] = {}
        # Listener name → its bound addresses once its accept loop runs (absent: not yet).
        self._accepting: dict[str, list[tuple[str, int]]] = {}
        self._expected: list[str] = []
        self.draining = False
        self._nursery: trio.Nursery | None = None
        self._round: _Round | None = None
        self._running: dict[str, float] = {}  # check name → when its current run started
        self._last_ok: dict[str, bool] = {}

    # -- what the app tells us ---------------------------------------------------------------

    def expect_listeners(self, names: list[str]) -> None:
        self._expected = list(names)

    def listener_accepting(self, name: str, addresses: list[tuple[str, int]]) -> None:
        self._accepting[name] = list(addresses)

    def listener_stopped(self, name: str) -> None:
        self._accepting.pop(name, None)

    def begin_drain(self) -> None:
        self.draining = True

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def remove_check(self, name: str) -> None:
        """Stop running ``name`` (a listener a reload removed)."""
        self._checks.pop(name, None)
        self._last_ok.pop(name, None)

    # -- the background tasks ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks that run checks, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- the endpoints -----------------------------------------------------------------------

    def live(self) -> tuple[int, bytes]:
        detail = "serving; draining" if self.draining else "serving"
        return 200, _body("ok", {"process": CheckResult(True, detail)})

    async def ready(self) -> tuple[int, bytes]:
        checks: dict[str, CheckResult] = {"listeners": self._listeners_check()}
        checks.update(await self._dependency_results())
        ok = all(r.ok for r in checks.values())
        return (200 if ok else 503), _body("ready" if ok else "not ready", checks)

    # -- checks ------------------------------------------------------------------------------

    def _listeners_check(self) -> CheckResult:
        if self.draining:
            return CheckResult(False, "draining: not taking new connections")
        missing = [n for n in self._expected if n not in self._accepting]
        if missing or not self._expected:
            return CheckResult(False, f"not accepting yet: {', '.join(missing) or 'no listener'}")
        parts = [
            f"{name} on {', '.join(f'{h}:{p}' for h, p in self._accepting[name])}"
            for name in self._expected
        ]
        return CheckResult(True, "accepting: " + "; ".join(parts))

    async def _dependency_results(self) -> dict[str, CheckResult]:
        if not self._checks:
            return {}
        now = self._clock()
        rnd = self._round
        fresh = (
            rnd is not None
            and rnd.finished_at is not None
            and now - rnd.finished_at < self._cache_for
        )
        if rnd is None or not (fresh or rnd.finished_at is None):
            if self._nursery is None:
                return {
                    name: CheckResult(False, "health checks are not running")
                    for name in self._checks
                }
            rnd = self._round = _Round(started=now)
            self._nursery.start_soon(self._coordinate, rnd)
        assert rnd is not None
        # The round ends by its own deadline; this bound only guards against a bug there.
        with trio.move_on_after(self.timeout + 1.0):
            await rnd.done.wait()
        return {name: self._result_of(rnd, name) for name in self._checks}

    def _result_of(self, rnd: _Round, name: str) -> CheckResult:
        return rnd.results.get(name) or CheckResult(
            False, f"no answer within {self.timeout:g}s"
        )

    async def _coordinate(self, rnd: _Round) -> None:
        assert self._nursery is not None
        all_done = trio.Event()
        pending = set(self._checks)

        def finished(name: str, result: CheckResult) -> None:
            if rnd.done.is_set():
                return  # a straggler of a round already reported
            rnd.results[name] = result
            pending.discard(name)
            if not pending:
                all_done.set()

        for name, check in self._checks.items():
            started = self._running.get(name)
            if started is not None:
                finished(
                    name,
                    CheckResult(
                        False,
                        f"still waiting on the previous check (started"
                        f" {max(0.0, self._clock() - started):.1f}s ago)",
                    ),
                )
                continue
            self._nursery.start_soon(self._run_check, name, check, finished)
        with trio.move_on_after(self.timeout):
            await all_done.wait()
        for name in pending:
            rnd.results[name] = CheckResult(False, f"no answer within {self.timeout:g}s")
        rnd.finished_at = self._clock()
        rnd.done.set()
        for name, result in rnd.results.items():
            if self._metrics is not None:
                self._metrics.readiness_checked(name, "ok" if result.ok else "failed")
            # Logged when a check's outcome changes, not on every probe.
            if self._last_ok.get(name, True) != result.ok:
                if result.ok:
                    log.info("readiness_check_recovered", check=name)
                else:
                    log.warning("readiness_check_failed", check=name, detail=result.detail)
            self._last_ok[name] = result.ok

    async def _run_check(
        self, name: str, check: Check, finished: Callable[[str, CheckResult], None]
    ) -> None:
        self._running[name] = self._clock()
        result: CheckResult
        try:
            with trio.move_on_after(self.timeout) as scope:
                detail = await check()
                result = CheckResult(True, detail)
            if scope.cancelled_caught:
                result = CheckResult(False, f"no answer within {self.timeout:g}s")
        except Exception as exc:
            result = CheckResult(False, _describe(exc))
        finally:
            self._running.pop(name, None)
        finished(name, result)


def _body(status: str, checks: Mapping[str, CheckResult]) -> bytes:
    doc = {"status": status, "checks": {n: r.as_json() for n, r in checks.items()}}
    return json.dumps(doc, indent=None, separators=(",", ":")).encode() + b"\n"


def identity_check(get: Callable[[str], Awaitable[Any]]) -> Check:
    """The LocalAPI check: ``get`` is :meth:`LocalAPIClient.get` (bounded by its timeout)."""

    async def check() -> str:
        resp = await get("/localapi/v0/status?peers=false")
        if resp.status != 200:
            raise RuntimeError(f"tailscaled status: HTTP {resp.status}")
        try:
            body = json.loads(resp.body)
        except ValueError:
            raise RuntimeError("tailscaled status: not JSON") from None
        state = body.get("BackendState") if isinstance(body, dict) else None
        if isinstance(state, str) and state != "Running":
            raise RuntimeError(f"tailscaled is {state}, not Running")
        return "tailscaled answered" + (f" ({state})" if isinstance(state, str) else "")

    return check


def backend_check(pools: AdminPools) -> Check:
    """``select 1`` on a pooled admin session of the listener's admin database."""

    def select_one(sess: AdminSession) -> list[list[Any]]:
        return sess.run("select 1")

    async def check() -> str:
        rows = await pools.run(pools.admin_database, select_one)
        if rows != [[1]]:
            raise RuntimeError(f"select 1 answered {rows!r}")
        return f"select 1 on {pools.admin_database} answered"

    return check
