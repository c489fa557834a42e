"""The one error family of the PostgreSQL wire core.

Every violation of the protocol by a peer raises a :class:`ProtocolError` (or a
subclass) whose message says exactly what was wrong, and whose ``sqlstate`` is
the SQLSTATE a PostgreSQL server would use for it.  Messages never contain
secrets (passwords, SCRAM proofs, salted passwords).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "BackendError",
    "LoginError",
    "ProtocolError",
    "UnsupportedCertificate",
    "UnsupportedProtocolVersion",
]


class ProtocolError(Exception):
    """A peer broke the PostgreSQL wire protocol.

    ``sqlstate`` defaults to ``08P01`` (protocol_violation).
    """

    default_sqlstate = "08P01"

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate if sqlstate is not None else self.default_sqlstate

    def __str__(self) -> str:
        return self.message


class UnsupportedProtocolVersion(ProtocolError):
    """A StartupMessage asked for a protocol major version other than 3."""

    default_sqlstate = "0A000"


class LoginError(ProtocolError):
    """The backend misbehaved during authentication, or asked for something we
    cannot or will not do (an unsupported method, a password we do not have, a
    SCRAM exchange with a bad nonce or a wrong server signature, ...).

    ``sqlstate`` defaults to ``08004`` (the connection was rejected).
    """

    default_sqlstate = "08004"


class UnsupportedCertificate(ProtocolError):
    """A certificate from which no ``tls-server-end-point`` binding can be made."""

    default_sqlstate = "08004"


class BackendError(ProtocolError):
    """The backend sent an ErrorResponse.

    ``fields`` is the complete field map of that ErrorResponse (field code →
    value), in wire order, for the proxy to forward verbatim; ``sqlstate`` is
    its ``C`` field.
    """

    def __init__(self, fields: Mapping[str, str]) -> None:
        frozen = MappingProxyType(dict(fields))
        severity = frozen.get("V", frozen.get("S", "ERROR"))
        sqlstate = frozen.get("C", "XX000")
        text = frozen.get("M", "(no message)")
        super().__init__(f"backend {severity} {sqlstate}: {text}", sqlstate=sqlstate)
        self.fields: Mapping[str, str] = frozen
