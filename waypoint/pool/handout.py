"""What a client given a pooled backend is sent in place of the backend's own session start."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from waypoint.pgwire import BackendKeyData, ParameterStatus, ReadyForQuery


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
    by the client's own ``key``; the backend's real secret never reaches the client.

    Runs in every pooled handshake, so it walks the message headers (type byte, length)
    without making a message of each; ``raw`` was framed by :class:`MessageReader` (or made
    here), and a length that does not fit still raises."""
    out = bytearray()
    start = at = 0
    end = len(raw)
    while at < end:
        if end - at < 5:
            raise ValueError("a session start ends inside a message")
        length = int.from_bytes(raw[at + 1 : at + 5], "big")
        nxt = at + 1 + length
        if length < 4 or nxt > end:
            raise ValueError("a session start ends inside a message")
        if raw[at] == _KEY_TYPE:
            out += raw[start:at]
            out += key.encode()
            start = nxt
        at = nxt
    out += raw[start:]
    return bytes(out)


_KEY_TYPE = ord("K")


__all__ = ["session_start", "updated_parameters", "with_client_key"]
