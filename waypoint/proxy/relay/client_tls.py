"""Client TLS in the relay engine: the session's TLS state, handed over after its handshake,
and the record transforms the engine thread applies to it (no I/O here).

The interface by which the engine receives a client's TLS session is :class:`TlsHandover`:
a server-side :class:`ssl.SSLObject` with its incoming / outgoing :class:`ssl.MemoryBIO`
and any ciphertext produced but not yet sent. Whoever did the handshake builds it (a
session: ``waypoint.proxy.streams.ServerTLSStream.handover``).
"""

from __future__ import annotations

import ssl

import attrs


@attrs.frozen
class TlsHandover:
    """A client TLS session moved into the engine after its handshake.

    ``ssl_object`` must be a server-side :class:`ssl.SSLObject` whose handshake is
    complete, reading ciphertext from ``incoming`` and writing it to ``outgoing``
    (which must be empty). ``unsent`` is ciphertext produced but not yet sent (e.g. TLS
    1.3 session tickets held back until the first write); it goes out first.
    Ciphertext already in ``incoming`` (pipelined by the client) is decrypted first.
    From the hand-over on, only the engine thread touches these objects.
    """

    ssl_object: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    unsent: bytes = b""

    def check(self) -> None:
        """Raise ``ValueError`` unless the engine can take this session over."""
        if not self.ssl_object.server_side:
            raise ValueError("client_tls must be the server side of the client's TLS session")
        if self.outgoing.pending:
            raise ValueError("client_tls still has unsent ciphertext")


class TlsEnd(Exception):
    """The client ended its TLS stream (close_notify, or EOF under it)."""


def encrypt(tls: TlsHandover, plaintext: bytes) -> bytes:
    """The TLS records for ``plaintext`` (raises ``ssl.SSLError``)."""
    tls.ssl_object.write(plaintext)
    return tls.outgoing.read()


def take_ciphertext(tls: TlsHandover, ciphertext: bytes) -> None:
    """Ciphertext received from the client (``b""``: EOF under TLS)."""
    if ciphertext:
        tls.incoming.write(ciphertext)
    else:
        tls.incoming.write_eof()


def decrypt(tls: TlsHandover, size: int) -> bytes | None:
    """The next plaintext (at most ``size`` bytes), or None until more ciphertext comes.
    Raises :class:`TlsEnd` at the end of the client's stream, ``ssl.SSLError`` on a bad
    record."""
    try:
        data = tls.ssl_object.read(size)
    except ssl.SSLWantReadError:
        return None
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as exc:
        raise TlsEnd from exc
    if not data:
        raise TlsEnd
    return data


def own_records(tls: TlsHandover) -> bytes:
    """Records TLS produced by itself while reading (a key update answer, an alert)."""
    return tls.outgoing.read() if tls.outgoing.pending else b""
