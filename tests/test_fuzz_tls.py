"""The ClientHello peek of direct-TLS connections (waypoint/proxy/tls.py) as untrusted
input: generated ClientHellos (any SNI and ALPN lists, extensions in any order,
fragmented over several records) parse back to what was sent; arbitrary and mutated
bytes give None, a length, ClientHelloInfo or ClientHelloError, never another
exception."""

from __future__ import annotations

import contextlib
import ssl

from hypothesis import given
from hypothesis import strategies as st

from waypoint.proxy.tls import (
    MAX_CLIENT_HELLO,
    ClientHelloError,
    ClientHelloInfo,
    client_hello_length,
    parse_client_hello,
)


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _ext(ext_type: int, data: bytes) -> bytes:
    return _u16(ext_type) + _u16(len(data)) + data


def sni_ext(name: bytes) -> bytes:
    entry = b"\x00" + _u16(len(name)) + name
    return _ext(0, _u16(len(entry)) + entry)


def alpn_ext(protocols: list[bytes]) -> bytes:
    body = b"".join(bytes([len(p)]) + p for p in protocols)
    return _ext(16, _u16(len(body)) + body)


def client_hello(
    extensions: list[bytes], session_id: bytes = b"", ciphers: bytes = b"\x13\x01"
) -> bytes:
    exts = b"".join(extensions)
    body = (
        b"\x03\x03"
        + bytes(32)
        + bytes([len(session_id)])
        + session_id
        + _u16(len(ciphers))
        + ciphers
        + b"\x01\x00"
        + _u16(len(exts))
        + exts
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, cuts: list[int]) -> bytes:
    out = b""
    start = 0
    for cut in [*sorted(set(c for c in cuts if 0 < c < len(handshake))), len(handshake)]:
        frag = handshake[start:cut]
        out += b"\x16\x03\x01" + _u16(len(frag)) + frag
        start = cut
    return out


hostname = st.from_regex(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}\.){0,4}[A-Za-z0-9]{1,10}\.?", fullmatch=True
)
protocol = st.binary(min_size=1, max_size=30).filter(lambda b: b.isascii())
other_ext = st.builds(_ext, st.integers(17, 0xFFFF), st.binary(max_size=40))


@given(
    name=st.none() | hostname,
    protocols=st.lists(protocol, max_size=4),
    others=st.lists(other_ext, max_size=3),
    order=st.randoms(use_true_random=False),
    session_id=st.binary(max_size=32),
    cuts=st.lists(st.integers(1, 600), max_size=4),
)
def test_generated_client_hellos_parse_back_in_any_fragmentation(
    name: str | None,
    protocols: list[bytes],
    others: list[bytes],
    order: object,
    session_id: bytes,
    cuts: list[int],
) -> None:
    exts = list(others)
    if name is not None:
        exts.append(sni_ext(name.encode()))
    if protocols:
        exts.append(alpn_ext(protocols))
    order.shuffle(exts)  # type: ignore[attr-defined]
    wire = records(client_hello(exts, session_id), cuts)
    # Incomplete until the last byte, then exactly the whole input.
    for i in range(0, len(wire), max(1, len(wire) // 7)):
        assert client_hello_length(wire[:i]) is None
    assert client_hello_length(wire) == len(wire)
    assert client_hello_length(wire + b"\x17\x03\x03") == len(wire)
    info = parse_client_hello(wire)
    assert info.server_name == (None if name is None else name.rstrip(".").lower())
    assert info.alpn == tuple(p.decode() for p in protocols)


@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_give_a_length_none_or_client_hello_error(data: bytes) -> None:
    _length_then_parse(data)


@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_behind_a_handshake_header_never_crash(data: bytes) -> None:
    _length_then_parse(b"\x16\x03\x01" + _u16(len(data)) + data)
    _length_then_parse(
        b"\x16\x03\x01" + _u16(len(data) + 4) + b"\x01" + len(data).to_bytes(3, "big") + data
    )


def _real_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="db.example.ts.net")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


REAL_HELLO = _real_hello()


def test_a_real_client_hello_gives_its_sni_and_alpn() -> None:
    assert client_hello_length(REAL_HELLO) == len(REAL_HELLO)
    assert parse_client_hello(REAL_HELLO) == ClientHelloInfo("db.example.ts.net", ("postgresql",))


@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(REAL_HELLO) - 1), st.integers(0, 255)), min_size=1, max_size=6
    ),
    cut=st.integers(0, len(REAL_HELLO)),
)
def test_mutated_real_client_hellos_never_crash(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(REAL_HELLO)
    for pos, value in flips:
        data[pos] = value
    _length_then_parse(bytes(data[:cut]) if cut < 5 else bytes(data))


def _length_then_parse(data: bytes) -> None:
    try:
        length = client_hello_length(data)
    except ClientHelloError:
        return
    if length is None:
        return
    assert 0 < length <= len(data)
    assert length <= MAX_CLIENT_HELLO + 5 + 16384 + 2048
    try:
        info = parse_client_hello(data[:length])
    except ClientHelloError:
        return
    assert isinstance(info, ClientHelloInfo)
    assert all(isinstance(p, str) for p in info.alpn)
