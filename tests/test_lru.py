"""The bounded LRU map (waypoint/lru.py) against a plain model, and the recent-peers map of
the connecting source that ages peers by when they were served, not when they were looked at."""

from __future__ import annotations

import types
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from waypoint.lru import LRU
from waypoint.proxy import source as source_module
from waypoint.proxy.source import RECENT_FOR, ConnectingSource

#: (operation, key, value): "get" and "peek" ignore the value.
OPS = st.lists(
    st.tuples(st.sampled_from(["get", "peek", "put"]), st.integers(0, 7), st.integers()),
    max_size=60,
)


class Model:
    """The LRU as a list of (key, value), least recently used first: obviously right, slow."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.entries: list[tuple[int, int]] = []

    def _find(self, key: int) -> int | None:
        return next((i for i, (k, _) in enumerate(self.entries) if k == key), None)

    def get(self, key: int) -> int | None:
        i = self._find(key)
        if i is None:
            return None
        entry = self.entries.pop(i)
        self.entries.append(entry)
        return entry[1]

    def peek(self, key: int) -> int | None:
        i = self._find(key)
        return None if i is None else self.entries[i][1]

    def put(self, key: int, value: int) -> None:
        i = self._find(key)
        if i is not None:
            del self.entries[i]
        self.entries.append((key, value))
        del self.entries[: max(0, len(self.entries) - self.maxsize)]


@given(maxsize=st.integers(1, 5), ops=OPS)
def test_lru_behaves_as_the_model(maxsize: int, ops: list[tuple[str, int, int]]) -> None:
    lru: LRU[int, int] = LRU(maxsize)
    model = Model(maxsize)
    for op, key, value in ops:
        if op == "put":
            lru.put(key, value)
            model.put(key, value)
        else:
            assert getattr(lru, op)(key) == getattr(model, op)(key), (op, key)
        assert list(lru.items()) == model.entries
        assert len(lru) == len(model.entries) <= maxsize
        assert all(k in lru for k, _ in model.entries)


def test_the_least_recently_used_goes_first_and_a_peek_does_not_count() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recently used
    lru.put("c", 3)
    assert "b" not in lru and [k for k, _ in lru.items()] == ["a", "c"]
    assert lru.peek("a") == 1  # a stays the least recently used
    lru.put("d", 4)
    assert [k for k, _ in lru.items()] == ["c", "d"]
    lru.put("c", 5)  # storing again counts as a use
    assert list(lru.items()) == [("d", 4), ("c", 5)]
    assert lru.get("gone") is None and lru.peek("gone") is None


@pytest.mark.parametrize("maxsize", [0, -1])
def test_an_lru_holds_at_least_one_entry(maxsize: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        LRU(maxsize)


def _source() -> ConnectingSource:
    listener: Any = types.SimpleNamespace(backend_address=("127.0.0.1", 5432), pool=False)
    return ConnectingSource(listener, None, None, None, trio.CapacityLimiter(1), end_bound=1.0)


async def test_recent_peers_age_by_service_not_by_lookup(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(source_module, "RECENT_PEERS", 2)
    source = _source()
    assert not source.recently_served("100.64.0.1")
    source.served("100.64.0.1")
    source.served("100.64.0.2")
    assert source.recently_served("100.64.0.1")  # a look: .1 stays the longest unserved
    source.served("100.64.0.3")
    assert not source.recently_served("100.64.0.1")
    assert source.recently_served("100.64.0.2") and source.recently_served("100.64.0.3")
    mock_clock.jump(RECENT_FOR - 1)
    source.served("100.64.0.3")  # served again: its time starts anew
    mock_clock.jump(1)
    assert not source.recently_served("100.64.0.2")
    assert source.recently_served("100.64.0.3")
