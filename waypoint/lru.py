"""A small bounded map that forgets its least recently used entry first.

Waypoint keeps a few things per distinct input on the connect path (the parse of an
identity's grant rules, the identity read from a whois answer, the peers served lately), each
bounded so that a stream of distinct inputs cannot grow the process. :class:`LRU` is that one
bounded map. It wraps :class:`collections.OrderedDict` (C in CPython: a lookup, a move to the
end and an eviction from the front each cost O(1)) and adds nothing per entry (a plain
``dict`` finds its oldest entry by scanning past the ones deleted before it). On these paths
an operation costs at most about 1.6 times the hand-written ``OrderedDict`` loops it
replaced (about 0.1 µs more, on a connection that takes milliseconds);
``cachetools.LRUCache`` costs about 2 to 4 times, and has no read that leaves the order
alone (``bench/lru_bench.py``).

``None`` is never a value: :meth:`LRU.get` and :meth:`LRU.peek` answer None for an absent key.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

__all__ = ["LRU"]


class LRU(Generic[K, V]):
    """At most ``maxsize`` entries; storing one more forgets the least recently used.

    A :meth:`get` or a :meth:`put` makes its key the most recently used; a :meth:`peek` reads
    without doing so (a cache whose entries age by when they were stored, not when they were
    read)."""

    __slots__ = ("_data", "_lookup", "_touch", "maxsize")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"an LRU holds at least one entry, not {maxsize}")
        self.maxsize = maxsize
        #: Least recently used first.
        self._data: collections.OrderedDict[K, V] = collections.OrderedDict()
        # The dict's own methods, bound once: a hit then costs two C calls and no attribute
        # lookups on the dict (about a tenth of what a get costs here).
        self._lookup = self._data.get
        self._touch = self._data.move_to_end

    def __repr__(self) -> str:
        return f"LRU({len(self._data)}/{self.maxsize})"

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        """The value for ``key`` (now the most recently used), or None."""
        value = self._lookup(key)
        if value is not None:
            self._touch(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value for ``key``, or None; its place in the order stays as it was."""
        return self._lookup(key)

    def put(self, key: K, value: V) -> None:
        """Store ``value`` for ``key``, as the most recently used; past ``maxsize``, forget
        the least recently used."""
        data = self._data
        data[key] = value
        self._touch(key)
        while len(data) > self.maxsize:
            data.popitem(last=False)

    def items(self) -> Iterator[tuple[K, V]]:
        """The entries, least recently used first (for tests and inspection)."""
        return iter(self._data.items())
