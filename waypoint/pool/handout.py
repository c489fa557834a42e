"""What a client given a pooled backend is sent in place of the backend's own session start."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from waypoint.pgwire import BackendKeyData, MessageReader, ParameterStatus, ReadyForQuery


def updated_parameters(
    held: Mapping[str, str], reported: Iterable[tuple[str, str]]
) -> dict[str, str]:
    """The reported settings a backend holds: ``held`` (as of its login, or its last reset)
    updated by the ParameterStatus messages it sent since (later ones win)."""
    out = dict(held)
    out.update(reported)
    return out


def session_start(parameters: Mapping[str, str], key: BackendKeyData | None) -> bytes:
    """ParameterStatus for each of ``parameters``, the client's BackendKeyData, and
    ReadyForQuery (idle), as a backend sends them after AuthenticationOk."""
    out = bytearray()
    for name, value in parameters.items():
        out += ParameterStatus(name, value).encode()
    if key is not None:
        out += key.encode()
    out += ReadyForQuery(b"I").encode()
    return bytes(out)


def with_client_key(raw: bytes, key: BackendKeyData) -> bytes:
    """A backend's session start (``raw``: whole messages) with its BackendKeyData replaced
    by the client's own ``key``; the backend's real secret never reaches the client."""
    reader = MessageReader()
    reader.feed(raw)
    out = bytearray()
    while (msg := reader.next_message()) is not None:
        out += key.encode() if msg.type == b"K" else msg.raw
    if reader.take_buffered():
        raise ValueError("a session start ends inside a message")
    return bytes(out)


__all__ = ["session_start", "updated_parameters", "with_client_key"]
