"""The relay: the data path of every session after the handshake.

One state machine, two drivers:

* :class:`~waypoint.proxy.relay.core.RelayCore` (core.py) — what a relay means, sans I/O:
  byte counts, the byte budget over both directions, the FATAL ErrorResponse injected
  toward the client exactly at a server→client message boundary, flush-then-finish after
  EOF or an error, and the verdict (:class:`RelayResult`).
* :class:`RelayEngine` — ONE OS thread running a level-triggered epoll loop over every
  relayed socket (loop.py). The common case (a plain socket readable: recv, count, skip
  headers, send) runs in C without the GIL (``_pump.Pump.run``,
  waypoint/proxy/relay/_pump.c); every other read is decided by the relay's core. The
  session task does its handshake in trio, detaches the two sockets and calls
  :meth:`RelayEngine.start_relay`; it then awaits :meth:`RelayHandle.wait` (bridge.py).
  Opened and closed with the trio app by :func:`open_relay_engine`. A client that speaks
  TLS is relayed by the engine too: its TLS session is handed over as a
  :class:`TlsHandover` (client_tls.py) and its records are decrypted/encrypted by the C
  loop on the session's own ``SSL*`` (or by the ``SSLObject`` in the engine thread, the
  fallback); the backend side stays plain.
* :func:`relay_streams` / :class:`StreamRelay` — a trio task per direction over
  ``trio.abc.Stream`` objects, for any pair of streams (TLS on the backend side).

No buffer is shared between relays: whatever one relay's bytes do, they cannot reach
another relay's peer. Neither driver closes the sockets or streams it was given: the
session does that after reading the verdict.
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
from .bridge import RelayHandle
from .client_tls import TlsHandover
from .engine import RelayEngine, open_relay_engine
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
]
