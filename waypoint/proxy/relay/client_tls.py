"""Client TLS in the relay engine: the session's TLS state, handed over after its handshake,
and the record transforms the engine thread applies to it (no I/O here).

The interface by which the engine receives a client's TLS session is :class:`TlsHandover`:
a server-side :class:`ssl.SSLObject` with its incoming / outgoing :class:`ssl.MemoryBIO`
and any ciphertext produced but not yet sent. Whoever did the handshake builds it (a
session: ``waypoint.proxy.streams.ServerTLSStream.handover``).

The engine then runs the record layer in one of two ways, behind one interface
(:class:`TlsRecords`):

* :class:`CRecords` — in C: the client's ``_pump.Lane`` takes over the very ``SSL*`` of
  the ``SSLObject`` and its two BIOs (``Lane.tls_attach``), and the C loop decrypts and
  encrypts application data without the GIL, with the same counting, budget and
  message-boundary tracking as plain bytes. The Python paths of the loop (a read past the
  budget, the FATAL, back-pressure) call the lane's ``tls_*`` methods.
* :class:`PythonRecords` — ``SSLObject.read`` / ``write`` in the engine thread, under the
  GIL: when ``tls_attach`` refuses (an interpreter whose ``_ssl`` objects or libssl it
  cannot verify) or the engine was opened with ``c_tls=False``.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
from typing import Protocol

import attrs

from . import _pump


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


class TlsRecords(Protocol):
    """The record layer of one client TLS session in the engine (see the module docstring).
    Failures raise ``ssl.SSLError``."""

    #: True: the C loop runs it (the relay can be pumped).
    in_c: bool

    def encrypt(self, plaintext: bytes) -> bytes:
        """The TLS records for ``plaintext``."""
        ...

    def take(self, ciphertext: bytes) -> None:
        """Ciphertext received from the client (``b""``: EOF under TLS)."""
        ...

    def decrypt(self, size: int) -> bytes | None:
        """The next plaintext (at most ``size`` bytes), or None until more ciphertext
        comes; raises :class:`TlsEnd` at the end of the client's stream."""
        ...

    def own_records(self) -> bytes:
        """Records TLS produced by itself while reading (a key update answer, an alert)."""
        ...


class PythonRecords:
    """The record layer on the ``SSLObject``, in Python (the fallback)."""

    __slots__ = ("tls",)
    in_c = False

    def __init__(self, tls: TlsHandover) -> None:
        self.tls = tls

    def encrypt(self, plaintext: bytes) -> bytes:
        return encrypt(self.tls, plaintext)

    def take(self, ciphertext: bytes) -> None:
        take_ciphertext(self.tls, ciphertext)

    def decrypt(self, size: int) -> bytes | None:
        return decrypt(self.tls, size)

    def own_records(self) -> bytes:
        return own_records(self.tls)


class CRecords:
    """The record layer in C, on the lane that took the session over (``tls_attach``)."""

    __slots__ = ("lane",)
    in_c = True

    def __init__(self, lane: _pump.Lane) -> None:
        self.lane = lane

    def encrypt(self, plaintext: bytes) -> bytes:
        return self.lane.tls_encrypt(plaintext)

    def take(self, ciphertext: bytes) -> None:
        self.lane.tls_take(ciphertext)

    def decrypt(self, size: int) -> bytes | None:
        data = self.lane.tls_decrypt(size)
        if data == b"":
            raise TlsEnd
        return data

    def own_records(self) -> bytes:
        return self.lane.tls_own()


@functools.cache
def c_tls_available() -> bool:
    """The C loop can run client TLS: it was given the OpenSSL functions of Python's own
    ``_ssl`` module (resolved by ctypes through that module, so the very library that made
    every ``SSLObject``), and they are OpenSSL 3 of the version ``_ssl`` reports. False for
    an ``_ssl`` built into the interpreter or without those functions."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        addresses = {
            name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _pump.TLS_FUNCTIONS
        }
    except (AttributeError, OSError):
        return False
    return _pump.tls_bind(addresses)


def records_for(lane: _pump.Lane, tls: TlsHandover, *, c_tls: bool) -> TlsRecords:
    """The record layer for a handed-over session: in C on ``lane`` when ``c_tls`` and the
    lane can take the session over safely, else in Python."""
    debugging = getattr(tls.ssl_object.context, "_msg_callback", None) is not None
    if (
        c_tls
        and not debugging
        and c_tls_available()
        and lane.tls_attach(tls.ssl_object, tls.incoming, tls.outgoing)
    ):
        return CRecords(lane)
    return PythonRecords(tls)


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
