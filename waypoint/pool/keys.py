"""A cancel key of its own for each client of a pooled backend.

A pooled backend serves one client after another; its real cancel key does not change. Each
client is given the backend's real process id and a fresh random secret
(:func:`client_cancel_key`); the cancel registry maps that (pid, secret) to the backend's real
secret, sealed with the client's (:class:`waypoint.state.base.CancelTarget`). When a client's
session ends its entry is withdrawn before the backend is pooled again, so its key cancels
nothing afterwards, not even the next client's statements on the same backend.
"""

from __future__ import annotations

import secrets
from typing import Final

from waypoint.pgwire import BackendKeyData
from waypoint.state.base import CancelTarget, seal_backend_secret

#: Cancel secret length on protocol 3.0 and 3.1 (the wire's fixed Int32).
SECRET_LENGTH_3_0: Final = 4
#: On protocol 3.2 the length is the server's choice up to 256 bytes; PostgreSQL 18 uses 32.
SECRET_LENGTH_3_2: Final = 32


def secret_length(protocol: tuple[int, int]) -> int:
    """The cancel secret length a client that negotiated ``protocol`` accepts."""
    return SECRET_LENGTH_3_2 if protocol >= (3, 2) else SECRET_LENGTH_3_0


def client_cancel_key(
    backend_key: BackendKeyData,
    protocol: tuple[int, int],
    target: CancelTarget,
) -> tuple[BackendKeyData, CancelTarget]:
    """A new client's key for a backend whose real key is ``backend_key`` (the backend's pid,
    a fresh secret of the negotiated ``protocol``'s length), and the cancel-registry target
    for it: ``target`` with the backend's real secret sealed with the client's."""
    secret = secrets.token_bytes(secret_length(protocol))
    sealed = seal_backend_secret(backend_key.pid, secret, backend_key.secret)
    mapped = CancelTarget(target.listener, target.backend, target.principal, sealed)
    return BackendKeyData(backend_key.pid, secret), mapped


__all__ = ["SECRET_LENGTH_3_0", "SECRET_LENGTH_3_2", "client_cancel_key", "secret_length"]
