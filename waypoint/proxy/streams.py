"""The client's TLS session during the handshake: Waypoint's own ``ssl.SSLObject`` over two
``ssl.MemoryBIO``s, driven over the accepted trio socket.

The session peeks at the ClientHello (for SNI and ALPN) before it picks a certificate; those
bytes go into the incoming BIO, so nothing has to be "unread". After the handshake the session
reads the startup packet and writes its answers through :class:`ServerTLSStream` (a
``trio.abc.Stream``); for the relay, :meth:`ServerTLSStream.handover` gives the epoll engine
the very same ``SSLObject`` and BIOs (ciphertext already received stays in the incoming BIO,
nothing waits in the outgoing one). No state is taken out of a third-party object.

Every wait here is a receive or send on the trio socket, so the caller's cancel scope (the
session's handshake deadline) bounds the handshake and every later call.
"""

from __future__ import annotations

import ssl

import trio

from waypoint.proxy.relay import TlsHandover

#: How much ciphertext one receive on the socket asks for (one full TLS record and its header).
RECV_SIZE = 16 * 1024 + 1024
#: What ``receive_some()`` without ``max_bytes`` returns at most (one record's plaintext).
READ_SIZE = 16 * 1024


class ServerTLSStream(trio.abc.Stream):
    """The server side of a client's TLS session over ``transport``.

    ``received``: bytes already read from ``transport`` (the peeked ClientHello and anything
    after it); they are the first ciphertext the ``SSLObject`` sees. Call :meth:`do_handshake`
    before anything else. One task may receive while another sends (the stream relay does);
    sends are serialised so that records leave in the order they were produced.
    """

    def __init__(
        self, transport: trio.SocketStream, context: ssl.SSLContext, received: bytes = b""
    ) -> None:
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        if received:
            self._incoming.write(received)
        self._send_lock = trio.Lock()
        self._handshake_done = False
        self._handed_over = False
        self._closed = False
        # A send or receive on the socket failed or was cancelled half-way: the TLS record
        # stream is no longer in step with the peer, so nothing more goes through it.
        self._broken: str | None = None

    # -- what the session reads off the stream ----------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    def version(self) -> str | None:
        return self._ssl.version()

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    # -- the handshake ----------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the server handshake. Raises ``trio.BrokenResourceError`` (its cause the
        ``ssl.SSLError`` or ``OSError``) when the peer fails it or goes away; a TLS alert
        the ``SSLObject`` produced is sent first, on a best-effort basis."""
        self._check_usable()
        if self._handshake_done:
            return
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                except ssl.SSLWantReadError:
                    await self._flush()
                    await self._fill()
                    continue
                except ssl.SSLError as exc:
                    await self._send_alert()
                    self._broken = f"TLS handshake failed: {exc}"
                    raise trio.BrokenResourceError(self._broken) from exc
                break
            # The server's last flight (and TLS 1.3 session tickets) go out now: a PostgreSQL
            # client writes its startup packet next and waits for an answer, never for these.
            await self._flush()
        except BaseException as exc:
            # Cancelled (the deadline) or failed half-way: this TLS state is never used again.
            if self._broken is None:
                self._broken = f"TLS handshake did not complete: {exc!r}"
            raise
        self._handshake_done = True

    # -- trio.abc.Stream --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext from the client (at most ``max_bytes``); ``b""`` after its close_notify."""
        self._check_usable(handshake=True)
        size = READ_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            try:
                data = self._ssl.read(size)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                await self._flush()
                return b""
            except ssl.SSLError as exc:
                await self._send_alert()
                self._broken = f"client TLS: {exc}"
                raise trio.BrokenResourceError(self._broken) from exc
            if self._outgoing.pending:
                # Reading produced records of its own (a key update answer).
                await self._flush()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_usable(handshake=True)
        if not data:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._broken = f"client TLS: {exc}"
            raise trio.BrokenResourceError(self._broken) from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        async with self._send_lock:
            await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify (when the session is still ours and intact), then close the
        socket. After :meth:`handover` only the socket object is closed: the TLS state
        belongs to the relay."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._handshake_done and not self._handed_over and self._broken is None:
                try:
                    self._ssl.unwrap()
                except ssl.SSLWantReadError:
                    pass  # close_notify written; we do not wait for the client's
                except ssl.SSLError:
                    pass
                await self._flush_quietly()
        finally:
            await self.transport_stream.aclose()

    # -- the relay --------------------------------------------------------------------------

    def handover(self) -> TlsHandover:
        """The TLS session for :meth:`RelayEngine.start_relay` (``client_tls``): this stream's
        ``SSLObject``, its incoming BIO (with any ciphertext the client sent ahead) and its
        empty outgoing BIO. The stream must not be read or written afterwards (it raises
        ``trio.ClosedResourceError``); :meth:`aclose` then only closes the socket object."""
        self._check_usable(handshake=True)
        if self._outgoing.pending:
            raise ValueError("the TLS stream still has unsent ciphertext")
        if self._send_lock.locked():
            raise ValueError("the TLS stream is sending")
        self._handed_over = True
        return TlsHandover(self._ssl, self._incoming, self._outgoing, b"")

    # -- internals --------------------------------------------------------------------------

    def _check_usable(self, *, handshake: bool = False) -> None:
        if self._closed or self._handed_over:
            raise trio.ClosedResourceError("the TLS stream was closed or handed over")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)
        if handshake and not self._handshake_done:
            raise RuntimeError("do_handshake() first")

    async def _fill(self) -> None:
        """One receive of ciphertext from the socket into the incoming BIO. A cancelled
        receive takes no bytes off the socket (trio), so the stream stays usable: the
        session can still send its FATAL after its deadline cut a read short."""
        try:
            data = await self.transport_stream.receive_some(RECV_SIZE)
        except trio.Cancelled:
            raise
        except BaseException as exc:
            self._broken = f"receive from the client failed: {exc!r}"
            raise
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush(self) -> None:
        """Send every ciphertext byte the ``SSLObject`` produced, in order."""
        async with self._send_lock:
            if not self._outgoing.pending:
                return
            data = self._outgoing.read()
            try:
                await self.transport_stream.send_all(data)
            except BaseException as exc:
                self._broken = f"send to the client failed: {exc!r}"
                raise

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
        except OSError:
            pass

    async def _send_alert(self) -> None:
        """A failed handshake or record leaves an alert in the outgoing BIO: tell the client."""
        if self._outgoing.pending and self._broken is None:
            await self._flush_quietly()
