"""What the connect path's bounded caches cost per connection: the hand-written
``OrderedDict`` loops they were, :class:`waypoint.lru.LRU`, and ``cachetools.LRUCache``.

``python -m bench.lru_bench [--rounds 7] [--number 200000]``

Three patterns, each as its cache meets it on every connection:

- ``rules``: the grant evaluation's parse of an identity's rules, looked up by ``id(rules)``
  and the tuple's identity checked (a hit; 100 identities' tuples kept, 512 at most);
- ``whois``: the identity read from a whois answer, looked up by the answer's bytes (a hit;
  100 answers of ~1.5 KiB kept, 512 at most);
- ``recent``: the peers served lately: a look without touching the order, then storing the
  peer as served (4096 kept, all full, so a new peer forgets the oldest);

and a ``miss`` pattern: a key not kept, stored, the oldest forgotten (512 kept).

Each variant runs the same loop over the same keys; the rounds interleave the variants and
the report gives, per pattern, the best round's ns per operation and its ratio to the
hand-written loop of the same run (< 1: faster). ``cachetools`` is optional: without it, its
column is left out. ``cachetools.LRUCache`` has no read that leaves the order alone, so its
``recent`` row touches on the look (what ``source.py`` must not do); it is timed that way
only to compare the cost.
"""

from __future__ import annotations

import argparse
import collections
import json
import timeit
from collections.abc import Callable
from typing import Any

from waypoint.lru import LRU

try:
    import cachetools
except ImportError:  # pragma: no cover: the optional comparison
    cachetools = None

KEPT = 100
BOUND = 512
RECENT = 4096

if cachetools is not None:

    class _CachetoolsLRU(cachetools.LRUCache):  # type: ignore[misc,type-arg]
        """``cachetools.LRUCache`` under :class:`LRU`'s names, so both run the same loops.
        It has no read that leaves the order alone: ``peek`` touches, as ``get`` does."""

        put = cachetools.LRUCache.__setitem__
        peek = cachetools.LRUCache.get


def _bodies() -> list[bytes]:
    return [
        json.dumps({"UserProfile": {"LoginName": f"u{n}@example.com"}, "pad": "x" * 1500}).encode()
        for n in range(KEPT)
    ]


def _peers() -> list[str]:
    return [f"100.64.{n // 256}.{n % 256}" for n in range(RECENT + KEPT)]


def _inline_rules() -> Callable[[], Any]:
    cache: collections.OrderedDict[int, tuple[Any, Any]] = collections.OrderedDict()
    keys = [(object(),) for _ in range(KEPT)]
    for k in keys:
        cache[id(k)] = (k, k)

    def run() -> Any:
        out = None
        for rules in keys:
            entry = cache.get(id(rules))
            if entry is not None and entry[0] is rules:
                cache.move_to_end(id(rules))
                out = entry[1]
        return out

    return run


def _inline_whois() -> Callable[[], Any]:
    cache: collections.OrderedDict[bytes, int] = collections.OrderedDict()
    keys = _bodies()
    for n, k in enumerate(keys):
        cache[k] = n

    def run() -> Any:
        out = None
        for body in keys:
            identity = cache.get(body)
            if identity is not None:
                cache.move_to_end(body)
                out = identity
        return out

    return run


def _inline_recent() -> Callable[[], Any]:
    cache: collections.OrderedDict[str, float] = collections.OrderedDict()
    peers = _peers()
    for p in peers[:RECENT]:
        cache[p] = 0.0
    batch = peers[-KEPT:] + peers[:KEPT]

    def run() -> Any:
        seen = None
        for peer in batch:
            seen = cache.get(peer)
            cache[peer] = 1.0
            cache.move_to_end(peer)
            while len(cache) > RECENT:
                cache.popitem(last=False)
        return seen

    return run


def _inline_miss() -> Callable[[], Any]:
    cache: collections.OrderedDict[int, int] = collections.OrderedDict()
    keys = list(range(10 * BOUND))

    def run() -> Any:
        for k in keys:
            if cache.get(k) is None:
                cache[k] = k
                while len(cache) > BOUND:
                    cache.popitem(last=False)
        return len(cache)

    return run


#: A cache class with :class:`LRU`'s get, peek and put, made with its bound.
Maker = Callable[[int], Any]


def _rules(make: Maker) -> Callable[[], Any]:
    cache = make(BOUND)
    keys = [(object(),) for _ in range(KEPT)]
    for k in keys:
        cache.put(id(k), (k, k))

    def run() -> Any:
        out = None
        for rules in keys:
            entry = cache.get(id(rules))
            if entry is not None and entry[0] is rules:
                out = entry[1]
        return out

    return run


def _whois(make: Maker) -> Callable[[], Any]:
    cache = make(BOUND)
    keys = _bodies()
    for n, k in enumerate(keys):
        cache.put(k, n)

    def run() -> Any:
        out = None
        for body in keys:
            identity = cache.get(body)
            if identity is not None:
                out = identity
        return out

    return run


def _recent(make: Maker) -> Callable[[], Any]:
    cache = make(RECENT)
    peers = _peers()
    for p in peers[:RECENT]:
        cache.put(p, 0.0)
    batch = peers[-KEPT:] + peers[:KEPT]

    def run() -> Any:
        seen = None
        for peer in batch:
            seen = cache.peek(peer)
            cache.put(peer, 1.0)
        return seen

    return run


def _miss(make: Maker) -> Callable[[], Any]:
    cache = make(BOUND)
    keys = list(range(10 * BOUND))

    def run() -> Any:
        for k in keys:
            if cache.get(k) is None:
                cache.put(k, k)
        return len(cache)

    return run


#: pattern -> (operations per run, the hand-written loop, the loop over a cache class)
PATTERNS: dict[str, tuple[int, Callable[[], Callable[[], Any]], Callable[[Maker], Any]]] = {
    "rules": (KEPT, _inline_rules, _rules),
    "whois": (KEPT, _inline_whois, _whois),
    "recent": (2 * KEPT, _inline_recent, _recent),
    "miss": (10 * BOUND, _inline_miss, _miss),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lru_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=200_000, help="operations per round")
    args = parser.parse_args(argv)
    makers: dict[str, Maker] = {"lru": LRU}
    if cachetools is not None:
        makers["cachetools"] = _CachetoolsLRU
    variants = ["inline", *makers]
    version = f" {cachetools.__version__}" if cachetools is not None else " (not installed)"
    print(f"ns per operation, best of {args.rounds} rounds; ratio to inline; cachetools{version}")
    print(f"{'pattern':8} " + " ".join(f"{v:>20}" for v in variants))
    for pattern, (ops, inline, loop) in PATTERNS.items():
        runs = {"inline": inline(), **{v: loop(make) for v, make in makers.items()}}
        loops = max(1, args.number // ops)
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for v in variants:  # interleaved: a load change hits every variant alike
                best[v] = min(best[v], timeit.timeit(runs[v], number=loops) / (loops * ops))
        base = best["inline"]
        print(
            f"{pattern:8} "
            + " ".join(f"{best[v] * 1e9:9.1f} ns {best[v] / base:6.2f}x" for v in variants)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
