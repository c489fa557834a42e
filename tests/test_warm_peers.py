"""WarmPeers: which peers get their backend connection opened during the whois."""

from __future__ import annotations

import pytest

from waypoint.proxy.registry import LoginGuess, WarmPeers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_is_warm_from_its_login_until_the_ttl() -> None:
    clock = Clock()
    warm = WarmPeers(ttl=60, clock=clock)
    assert not warm.is_warm("100.64.0.1")
    warm.mark("100.64.0.1")
    clock.now += 59.9
    assert warm.is_warm("100.64.0.1")
    assert not warm.is_warm("100.64.0.2")
    clock.now += 0.1
    assert not warm.is_warm("100.64.0.1")
    assert len(warm) == 0  # expired entries go when looked at


def test_a_new_login_restarts_the_ttl_and_a_refusal_ends_it() -> None:
    clock = Clock()
    warm = WarmPeers(ttl=60, clock=clock)
    warm.mark("a")
    clock.now += 50
    warm.mark("a")
    clock.now += 50
    assert warm.is_warm("a")
    warm.forget("a")
    warm.forget("never-seen")
    assert not warm.is_warm("a")


def test_the_table_is_bounded_and_drops_the_oldest_first() -> None:
    clock = Clock()
    warm = WarmPeers(ttl=600, max_entries=3, clock=clock)
    for peer in ("a", "b", "c"):
        warm.mark(peer)
        clock.now += 1
    warm.mark("a")  # refreshed: now the newest
    warm.mark("d")
    assert len(warm) == 3
    assert not warm.is_warm("b")
    assert all(warm.is_warm(p) for p in ("a", "c", "d"))


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        WarmPeers(ttl=0)
    with pytest.raises(ValueError):
        WarmPeers(max_entries=0)


def test_a_peer_keeps_what_it_logged_in_as_until_it_goes_cold() -> None:
    clock = Clock()
    warm = WarmPeers(ttl=60, clock=clock)
    guess = LoginGuess.of("wp_alice", "app", {"b": "2", "a": "1"}, (3, 0))
    assert guess == LoginGuess.of("wp_alice", "app", {"a": "1", "b": "2"}, (3, 0))
    assert guess != LoginGuess.of("wp_alice", "app", {"a": "1"}, (3, 0))
    assert guess != LoginGuess.of("wp_alice", "app", {"a": "1", "b": "2"}, (3, 2))
    assert guess.same_session("app", {"a": "1", "b": "2"}, (3, 0))
    assert not guess.same_session("other", {"a": "1", "b": "2"}, (3, 0))
    assert not guess.same_session("app", {"a": "1", "b": "2", "c": "3"}, (3, 0))
    warm.mark("a")
    assert warm.is_warm("a") and warm.guess("a") is None  # warm, nothing to log in as
    warm.mark("a", guess)
    assert warm.guess("a") == guess
    clock.now += 60
    assert warm.guess("a") is None and not warm.is_warm("a")
    warm.mark("a", guess)
    warm.forget("a")
    assert warm.guess("a") is None
