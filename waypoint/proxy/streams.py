"""Small trio stream adapters used during the handshake."""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.Stream):
    """A stream that first yields ``prefix`` (bytes already read from ``inner``), then reads on.

    Used to hand a TLS ClientHello we peeked at (for SNI, or a direct-TLS first byte) to
    ``trio.SSLStream`` as if it had not been read.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = bytearray(prefix)

    @property
    def pending(self) -> int:
        """Prefix bytes not yet read."""
        return len(self._prefix)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else min(max_bytes, len(self._prefix))
            out = bytes(self._prefix[:n])
            del self._prefix[:n]
            return out
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()
