"""atheris target: the ClientHello peek of direct-TLS connections
(``client_hello_length`` and ``parse_client_hello`` in waypoint/proxy/tls.py).

Bytes are fed in growing prefixes, as a socket would deliver them. Allowed:
None (need more), a length, ClientHelloInfo, or ClientHelloError. Properties: a
length never exceeds what was received; once a prefix gives a length, every longer
prefix gives the same; the SNI is lower-case without a trailing dot.

    python tests/fuzz/fuzz_client_hello.py -max_total_time=600 tests/fuzz/corpus/client_hello
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Chunks, fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    from waypoint.proxy.tls import (
        MAX_CLIENT_HELLO,
        ClientHelloError,
        ClientHelloInfo,
        client_hello_length,
        parse_client_hello,
    )


def test_one_input(data: bytes) -> None:
    chunks = Chunks(data)
    payload = chunks.payload
    received = 0
    length: int | None = None
    try:
        for piece in chunks.split():
            received += len(piece)
            found = client_hello_length(payload[:received])
            if found is not None:
                length = found
                break
    except ClientHelloError:
        return
    if length is None:
        return
    assert 0 < length <= received
    assert length <= MAX_CLIENT_HELLO + 5 + 16384 + 2048
    assert client_hello_length(payload) == length
    try:
        info = parse_client_hello(payload[:length])
    except ClientHelloError:
        return
    assert isinstance(info, ClientHelloInfo)
    if info.server_name is not None:
        assert info.server_name == info.server_name.lower()
        assert not info.server_name.endswith(".")
    assert all(isinstance(p, str) for p in info.alpn)


if __name__ == "__main__":
    fuzz(test_one_input)
