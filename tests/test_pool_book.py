"""The pool's bookkeeping (sans I/O, a fake clock): keys, lifetimes, bounds, eviction."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.observability.metrics import Metrics
from waypoint.pool import CLOSE_REASONS, Closing, PoolBook, PoolKey, PoolLimits, idle_cap

SERVER = ("10.0.0.1", 5432)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(role: str = "wp_alice", **over: object) -> PoolKey:
    fields: dict[str, object] = {
        "role": role,
        "listener": "pg",
        "server": SERVER,
        "database": "app",
        "protocol": (3, 0),
        "startup_parameters": {"user": "alice", "database": "app", "application_name": "psql"},
    }
    fields.update(over)
    return PoolKey.of(**fields)  # type: ignore[arg-type]


LIMITS = PoolLimits(idle_timeout=60, max_lifetime=3600, max_per_role=8, max_idle=100)


def test_key_leaves_out_user_and_database_and_compares_the_rest_exactly() -> None:
    k = key()
    assert k.parameters == (("application_name", "psql"),)
    assert key() == key(startup_parameters={"application_name": "psql", "user": "bob"})
    assert key() != key(startup_parameters={"application_name": "psql "})
    assert key() != key(startup_parameters={"application_name": "psql", "options": "-c x=1"})
    assert key() != key(protocol=(3, 2))
    assert key() != key(database="other")
    assert key() != key(listener="pg2")
    assert key() != key(server=("10.0.0.2", 5432))
    assert key() != key(role="wp_bob")


def test_a_backend_is_handed_out_only_for_an_equal_key() -> None:
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    assert book.keep(key(), "b1", born=clock.now, limits=LIMITS) == []
    for other in (key(role="wp_bob"), key(database="x"), key(listener="l2"), key(protocol=(3, 2))):
        assert book.take(other) == (None, [])
    entry, closing = book.take(key())
    assert entry is not None and entry.backend == "b1" and closing == []
    assert book.take(key()) == (None, [])


def test_the_newest_is_handed_out_first() -> None:
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    for name in ("old", "mid", "new"):
        book.keep(key(), name, born=clock.now, limits=LIMITS)
        clock.now += 1
    taken = [book.take(key())[0] for _ in range(3)]
    assert [e.backend for e in taken if e is not None] == ["new", "mid", "old"]


def test_idle_timeout_and_lifetime() -> None:
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    limits = PoolLimits(idle_timeout=60, max_lifetime=100, max_per_role=8, max_idle=100)
    born = clock.now
    book.keep(key(), "young", born=born, limits=limits)
    book.keep(key(role="wp_bob"), "old", born=born - 90, limits=limits)
    assert book.next_expiry() == born + 10  # old's lifetime ends first
    clock.now = born + 10
    entry, closing = book.take(key(role="wp_bob"))
    assert entry is None
    assert [(c.backend, c.reason) for c in closing] == [("old", "max_lifetime")]
    clock.now = born + 59.9
    assert book.expire() == []
    clock.now = born + 60
    assert [(c.backend, c.reason) for c in book.expire()] == [("young", "idle_timeout")]
    assert len(book) == 0
    # Past its lifetime already: not kept at all.
    closing = book.keep(key(), "ancient", born=clock.now - 100, limits=limits)
    assert [(c.backend, c.reason) for c in closing] == [("ancient", "max_lifetime")]
    assert len(book) == 0


def test_per_role_bound_closes_the_roles_longest_idle() -> None:
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    limits = PoolLimits(idle_timeout=60, max_lifetime=3600, max_per_role=2, max_idle=100)
    book.keep(key(), "a1", born=clock.now, limits=limits)
    clock.now += 1
    # Another startup parameter set of the same role counts toward the same bound.
    book.keep(key(startup_parameters={}), "a2", born=clock.now, limits=limits)
    clock.now += 1
    book.keep(key(role="wp_bob"), "b1", born=clock.now, limits=limits)
    clock.now += 1
    closing = book.keep(key(), "a3", born=clock.now, limits=limits)
    assert [(c.backend, c.reason) for c in closing] == [("a1", "max_per_role")]
    assert book.idle_by_role("pg") == {"wp_alice": 2, "wp_bob": 1}


def test_server_cap_takes_from_the_role_holding_the_most() -> None:
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    limits = PoolLimits(idle_timeout=600, max_lifetime=3600, max_per_role=10, max_idle=4)
    book.keep(key(role="wp_bob"), "bob1", born=clock.now, limits=limits)  # the oldest of all
    for i in range(3):
        clock.now += 1
        book.keep(key(), f"alice{i}", born=clock.now, limits=limits)
    clock.now += 1
    closing = book.keep(key(role="wp_carol"), "carol1", born=clock.now, limits=limits)
    # bob's is the longest idle of all, but alice holds the most: her longest-idle goes.
    assert [(c.backend, c.reason) for c in closing] == [("alice0", "max_idle")]
    # Another server is counted apart.
    other = key(server=("10.0.0.2", 5432))
    assert book.keep(other, "elsewhere", born=clock.now, limits=limits) == []
    assert len(book) == 5


def test_cap_ties_go_to_the_role_waiting_longest() -> None:
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    limits = PoolLimits(idle_timeout=600, max_lifetime=3600, max_per_role=10, max_idle=2)
    book.keep(key(role="wp_bob"), "bob1", born=clock.now, limits=limits)
    clock.now += 1
    book.keep(key(role="wp_carol"), "carol1", born=clock.now, limits=limits)
    clock.now += 1
    closing = book.keep(key(), "alice1", born=clock.now, limits=limits)
    assert [(c.backend, c.reason) for c in closing] == [("bob1", "max_idle")]


def test_close_where_removes_one_roles_backends() -> None:
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    book.keep(key(), "a1", born=clock.now, limits=LIMITS)
    book.keep(key(database="other"), "a2", born=clock.now, limits=LIMITS)
    book.keep(key(role="wp_bob"), "b1", born=clock.now, limits=LIMITS)
    closing = book.close_where(lambda k: k.role == "wp_alice", "role_closed")
    assert sorted(c.backend for c in closing) == ["a1", "a2"]
    assert {c.reason for c in closing} == {"role_closed"}
    assert book.idle_by_listener() == {"pg": 1}


def test_idle_cap() -> None:
    assert idle_cap(0.25, 100) == 25
    assert idle_cap(0.25, 3) == 1  # at least one
    assert idle_cap(1.0, 7) == 7
    assert idle_cap(0.125, 100) == 12
    with pytest.raises(ValueError):
        idle_cap(0, 100)
    with pytest.raises(ValueError):
        idle_cap(0.5, 0)


# --------------------------------------------------------------------- random operations

ROLES = ("wp_a", "wp_b", "wp_c")
SERVERS = (("10.0.0.1", 5432), ("10.0.0.2", 5432))
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("keep"),
            st.sampled_from(ROLES),
            st.sampled_from(SERVERS),
            st.sampled_from(("app", "other")),
            st.integers(0, 200),  # age at keep
        ),
        st.tuples(
            st.just("take"),
            st.sampled_from(ROLES),
            st.sampled_from(SERVERS),
            st.sampled_from(("app", "other")),
        ),
        st.tuples(st.just("wait"), st.floats(0, 50)),
        st.tuples(st.just("revoke"), st.sampled_from(ROLES)),
    ),
    max_size=80,
)


def _of_role(role: str, k: PoolKey) -> bool:
    return k.role == role


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 4), st.integers(1, 6))
def test_random_operations_keep_every_bound(
    operations: list[tuple[Any, ...]], per_role: int, cap: int
) -> None:
    clock = FakeClock()
    book: PoolBook[int] = PoolBook(clock)
    limits = PoolLimits(idle_timeout=40, max_lifetime=150, max_per_role=per_role, max_idle=cap)
    names = itertools.count()
    keys: dict[int, PoolKey] = {}
    born_at: dict[int, float] = {}
    closed: set[int] = set()
    taken: set[int] = set()

    def closes(closing: list[Closing[int]]) -> None:
        for c in closing:
            assert c.backend not in closed and c.backend not in taken  # closed once
            assert keys[c.backend] == c.key
            closed.add(c.backend)

    for op in operations:
        if op[0] == "keep":
            _, role, server, db, age = op
            backend = next(names)
            k = key(role=role, server=server, database=db)
            keys[backend] = k
            born_at[backend] = clock.now - age
            closes(book.keep(k, backend, born=born_at[backend], limits=limits))
        elif op[0] == "take":
            _, role, server, db = op
            k = key(role=role, server=server, database=db)
            entry, closing = book.take(k)
            closes(closing)
            if entry is not None:
                # Only its own key, never past a bound, never twice.
                assert keys[entry.backend] == k
                assert clock.now < born_at[entry.backend] + limits.max_lifetime
                assert clock.now < entry.idle_since + limits.idle_timeout
                assert entry.backend not in closed and entry.backend not in taken
                taken.add(entry.backend)
        elif op[0] == "wait":
            clock.now += op[1]
        else:
            closes(book.close_where(functools.partial(_of_role, op[1]), "role_closed"))
        for server in SERVERS:
            held = [e for e in book if e.key.server == server]
            assert len(held) <= cap
            for role in ROLES:
                assert sum(1 for e in held if e.key.role == role) <= per_role
            for db in ("app", "other"):
                # The index agrees with the entries, whatever was kept, taken or closed.
                k = key(role="", server=server, database=db)
                unroled = {attrs.evolve(e.key, role="") for e in book}
                assert book.holds_any_role(k) == (k in unroled)
                assert book.holds_any_role(attrs.evolve(k, role="wp_x")) == (k in unroled)
    # Every backend kept is pooled, handed out or closed: none is lost.
    pooled = {e.backend for e in book}
    assert pooled | taken | closed == set(keys)
    assert not (pooled & closed) and not (pooled & taken)


def test_pool_metrics_families() -> None:
    metrics = Metrics()
    clock = FakeClock()
    book: PoolBook[str] = PoolBook(clock)
    book.keep(key(), "a", born=clock.now, limits=LIMITS)
    book.keep(key(listener="other"), "b", born=clock.now, limits=LIMITS)
    book.keep(key(listener="other", role="wp_bob"), "c", born=clock.now, limits=LIMITS)
    metrics.pool_idle_now(["pg", "other", "quiet"], book.idle_by_listener())
    metrics.pool_taken("pg", hit=True)
    metrics.pool_taken("pg", hit=False)
    metrics.pool_reset("pg", ok=False)
    for reason in CLOSE_REASONS:
        metrics.pool_closed("pg", reason)
    text = metrics.render().decode()
    assert 'waypoint_pool_idle{listener="pg"} 1.0' in text
    assert 'waypoint_pool_idle{listener="other"} 2.0' in text
    assert 'waypoint_pool_idle{listener="quiet"} 0.0' in text
    assert 'waypoint_pool_hits_total{listener="pg"} 1.0' in text
    assert 'waypoint_pool_misses_total{listener="pg"} 1.0' in text
    assert 'waypoint_pool_resets_total{listener="pg",outcome="failed"} 1.0' in text
    assert 'waypoint_pool_closes_total{listener="pg",reason="max_idle"} 1.0' in text
    doc = (Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    for reason in CLOSE_REASONS:  # every reason is explained where the metric is
        assert f"`{reason}`" in doc, reason
