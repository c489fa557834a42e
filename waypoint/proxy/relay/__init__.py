"""The relay: the data path of every session after the handshake (SPEC §4 step 7).

Two implementations with one contract:

* :class:`RelayEngine` — ONE OS thread running a level-triggered epoll loop over
  every relayed socket (PERF.md: a trio task per direction reaches ~0.5x PgBouncer).
  The common case (a plain socket readable: recv, count, skip headers, send) runs
  in C without the GIL (``_pump.Pump.run``, waypoint/proxy/_pump.c); everything
  else is handled here in Python, on the same thread. The session task does its handshake
  in trio, detaches the two sockets and calls :meth:`RelayEngine.start_relay`;
  it then awaits :meth:`RelayHandle.wait`. Opened and closed with the trio app
  by :func:`open_relay_engine`. A client that speaks TLS can be relayed by the
  engine too: after the TLS handshake in trio, :func:`tls_handover` takes the
  ``SSLObject`` and its memory BIOs out of the ``trio.SSLStream`` and
  :meth:`RelayEngine.start_relay` with ``client_tls`` decrypts/encrypts in the engine thread
  (off the plaintext hot path; the backend side stays plain).
* :func:`relay_streams` / :class:`StreamRelay` — a trio task per direction over
  ``trio.abc.Stream`` objects, for any pair of streams (TLS on the backend side).

Both track message boundaries in both directions (``BoundaryTracker``), count
bytes, enforce ``max_bytes`` over both directions, and can be told to end the
session with a FATAL ErrorResponse injected toward the client exactly at a
server→client message boundary (``terminate``). Neither closes the sockets or
streams it was given: the session does that after reading the verdict.
"""

from .base import (
    DEFAULT_BOUNDARY_TIMEOUT,
    DEFAULT_FLUSH_TIMEOUT,
    RECV_BUFFER_SIZE,
    RelayControl,
    RelayEngineError,
    RelayReason,
    RelayResult,
)
from .engine import RelayEngine, RelayHandle, TlsHandover, open_relay_engine, tls_handover
from .streams import StreamRelay, relay_streams

__all__ = [
    "DEFAULT_BOUNDARY_TIMEOUT",
    "DEFAULT_FLUSH_TIMEOUT",
    "RECV_BUFFER_SIZE",
    "RelayControl",
    "RelayEngine",
    "RelayEngineError",
    "RelayHandle",
    "RelayReason",
    "RelayResult",
    "StreamRelay",
    "TlsHandover",
    "open_relay_engine",
    "relay_streams",
    "tls_handover",
]
