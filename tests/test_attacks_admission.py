"""Attacks on connection admission: the TLS ClientHello read before anyone is known, and (with
PostgreSQL and Redis) slots across two instances, slots of connections that die during their
setup, a caller naming someone else in its startup packet, and stalled TLS handshakes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from e2e_support import tls_client_hello

from waypoint.proxy.handshake import _read_client_hello
from waypoint.proxy.tls import ClientHelloError, ClientHelloScanner, client_hello_length

# -- a ClientHello sent in one-byte records -------------------------------------------------


class _Pieces:
    """A client (for ``_read_client_hello``) whose bytes arrive in the given pieces; its
    receive never checkpoints, so the read runs to its end in one ``send``."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces

    async def receive(self) -> bytes:
        return next(self._pieces)


def _one_byte_records(handshake_body: int) -> bytes:
    """A ClientHello handshake message of ``handshake_body`` bytes, one byte per TLS record."""
    message = b"\x01" + handshake_body.to_bytes(3, "big") + b"\0" * handshake_body
    return b"".join(b"\x16\x03\x01\x00\x01" + message[i : i + 1] for i in range(len(message)))


def _calls_to_read(wire: bytes, piece: int) -> int:
    """How many calls (Python and C) reading the ClientHello ``wire`` makes when it arrives
    ``piece`` bytes at a time: a count of work, the same on every run."""
    pieces = (wire[i : i + piece] for i in range(0, len(wire), piece))
    client: Any = _Pieces(pieces)
    coro = _read_client_hello(client, b"")
    calls = 0

    def count(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        coro.send(None)
    except StopIteration as done:
        assert done.value == wire
    else:  # pragma: no cover - the read always ends here
        raise AssertionError("the ClientHello read waited")
    finally:
        sys.setprofile(None)
    return calls


def test_a_client_hello_dribbled_in_one_byte_records_costs_work_linear_in_its_bytes() -> None:
    """Before the peer is known it may send its ClientHello (up to 64 KiB) as one-byte TLS
    records, a record at a time: Waypoint must not look at every record again for each piece
    (that was quadratic: one such connection kept the event loop busy for the whole
    handshake timeout, and a few stalled every other client's handshake)."""
    small = _calls_to_read(_one_byte_records(150), piece=6)
    large = _calls_to_read(_one_byte_records(600), piece=6)
    # Four times the bytes: about four times the work (it was sixteen).
    assert large <= 6 * small, (small, large)



def test_a_client_hello_read_in_pieces_of_any_size_ends_where_it_ends_in_one() -> None:
    hello = tls_client_hello(alpn=("postgresql",))
    assert client_hello_length(hello) == len(hello)
    for piece in range(1, 12):
        assert _calls_to_read(hello, piece) > 0  # the read returned the whole hello
        scanner = ClientHelloScanner()
        found = [scanner.feed(hello[i : i + piece]) for i in range(0, len(hello), piece)]
        assert found[-1] == len(hello) and set(found[:-1]) <= {None}, piece
    # A record that is not a handshake is refused when its header arrives, in whatever
    # pieces the records before it came.
    wire = _one_byte_records(10)[:18] + b"\x17\x03\x03\x00\x01"
    scanner = ClientHelloScanner()
    assert [scanner.feed(wire[i : i + 4]) for i in range(0, 20, 4)] == [None] * 5
    with pytest.raises(ClientHelloError, match="not a TLS handshake record"):
        scanner.feed(wire[20:])
