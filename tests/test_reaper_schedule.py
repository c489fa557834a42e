"""The reaper's schedule under ``trio.testing.MockClock`` with fake passes (no I/O), and the
pure parts of a pass (LIKE escaping, the CockroachDB switch)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.provision.dialect import CockroachDialect
from waypoint.provision.engine import Provisioner
from waypoint.reaper import Reaper
from waypoint.reaper.catalog import like_prefix
from waypoint.reaper.schedule import default_pass_timeout, reap_periodically


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class FakePass:
    def __init__(self, durations: list[float] | None = None, fail_on: set[int] | None = None):
        self.starts: list[float] = []
        self.running = 0
        self.max_running = 0
        self._durations = durations or []
        self._fail_on = fail_on or set()

    async def __call__(self) -> None:
        n = len(self.starts)
        self.starts.append(trio.current_time())
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if n < len(self._durations):
                await trio.sleep(self._durations[n])
            if n in self._fail_on:
                raise RuntimeError("admin connection lost")
        finally:
            self.running -= 1


async def run_for(seconds: float, fake: FakePass, interval: float, **kw: object) -> None:
    with trio.move_on_after(seconds):
        await reap_periodically(fake, interval, **kw)  # type: ignore[arg-type]


async def test_first_pass_runs_at_start_then_every_interval(mock_clock: object) -> None:
    fake = FakePass()
    start = trio.current_time()
    await run_for(35, fake, 10.0)
    assert [t - start for t in fake.starts] == [0, 10, 20, 30]


async def test_passes_never_overlap_and_an_overrun_is_followed_at_once(mock_clock: object) -> None:
    fake = FakePass(durations=[25.0, 1.0, 1.0])
    start = trio.current_time()
    await run_for(45, fake, 10.0, pass_timeout=100.0)
    assert fake.max_running == 1
    assert [t - start for t in fake.starts] == [0, 25, 35]


async def test_a_failing_pass_is_counted_and_the_schedule_goes_on(mock_clock: object) -> None:
    errors: list[BaseException | None] = []
    fake = FakePass(fail_on={0, 1})
    start = trio.current_time()
    await run_for(25, fake, 10.0, on_error=errors.append)
    assert [t - start for t in fake.starts] == [0, 10, 20]
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError]


async def test_a_pass_is_bounded_in_time(mock_clock: object) -> None:
    errors: list[BaseException | None] = []
    fake = FakePass(durations=[1000.0, 0.0])
    start = trio.current_time()
    await run_for(15, fake, 10.0, pass_timeout=5.0, on_error=errors.append)
    assert errors == [None]  # the timeout
    assert [t - start for t in fake.starts] == [0, 10]
    assert fake.running == 0


async def test_non_positive_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        await reap_periodically(FakePass(), 0.0)


def test_default_pass_timeout_is_the_interval_clamped() -> None:
    assert default_pass_timeout(1.0) == 60.0
    assert default_pass_timeout(300.0) == 300.0
    assert default_pass_timeout(3600.0) == 900.0


def test_default_reap_interval_is_a_quarter_of_ttl_at_most_an_hour() -> None:
    pg = PostgresListenerConfig(admin_user="a", admin_password="x", user_ttl=40.0)
    assert pg.effective_reap_interval == 10.0
    assert (
        PostgresListenerConfig(admin_user="a", admin_password="x").effective_reap_interval == 3600
    )
    assert (
        PostgresListenerConfig(
            admin_user="a", admin_password="x", reap_interval=5.0
        ).effective_reap_interval
        == 5.0
    )


@pytest.mark.parametrize(
    ("prefix", "pattern"),
    [("wp_", "wp!_%"), ("a_b_", "a!_b!_%"), ("plain", "plain%")],
)
def test_like_prefix_escapes_underscore(prefix: str, pattern: str) -> None:
    assert like_prefix(prefix) == pattern


def _listener(**pgopts: object) -> ListenerConfig:
    return ListenerConfig(
        name="pg-main",
        listen="127.0.0.1:0",
        backend="127.0.0.1:1",
        backend_tls="disable",
        postgres=PostgresListenerConfig(admin_user="a", admin_password="x", **pgopts),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("enabled", "disabled"), [(False, True), (True, False)])
async def test_cockroachdb_is_skipped_unless_reap_on_cockroachdb(
    enabled: bool, disabled: bool
) -> None:
    lst = _listener(reap_on_cockroachdb=enabled)
    prov = Provisioner(lst, handshake_timeout=1.0)
    reaper = Reaper(lst, prov)
    reaper._dialect = CockroachDialect("CockroachDB CCL v23.1.0", 23)  # as if probed
    try:
        if disabled:
            report = await reaper.run_pass()
            assert report.disabled is not None and "reap_on_cockroachdb" in report.disabled
            assert report.dropped_roles == () and report.failed == ()
        else:
            # Enabled: the pass goes on to list roles (and fails: nothing listens on port 1).
            from waypoint.reaper import ReapError

            with pytest.raises(ReapError, match="listing roles failed"):
                await reaper.run_pass()
    finally:
        await prov.aclose()


def test_max_drops_per_pass_must_be_positive() -> None:
    lst = _listener()
    with pytest.raises(ValueError, match="at least 1"):
        Reaper(lst, Provisioner(lst, handshake_timeout=1.0), max_drops_per_pass=0)
