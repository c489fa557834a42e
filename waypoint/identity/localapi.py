"""A small async client for tailscaled's LocalAPI on its unix socket.

HTTP/1.1 is spoken with **h11** (sans-IO): this module owns the socket, the
clock and the size bound; h11 owns the framing (``Content-Length`` and
``Transfer-Encoding: chunked`` bodies alike). Up to ``max_idle`` (8)
connections whose last exchange ended cleanly are kept alive for the next
calls, saving a connect per whois in a burst; a connection whose call failed
or timed out is closed, so none can hand a half-read response to the next
call. The requests and answers used are described in docs/localapi.md.

Every call is bounded by ``timeout`` (connect + request + response) and by a
maximum response size. Failures become distinct :class:`IdentityError`
subclasses, each carrying the :class:`~waypoint.errors.Refusal` a client will
see; the exception message (and ``refusal.detail``) says what happened, for
logs, and never contains secrets (no key material, no response bodies of
certificate calls).
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import math
import re
import time
import urllib.parse
from typing import Any, Final

import h11
import trio
from attrs import frozen

from waypoint import errors
from waypoint.config.units import json_type
from waypoint.identity.model import IdentityError

LOCALAPI_HOST: Final = "local-tailscaled.sock"
DEFAULT_MAX_RESPONSE: Final = 1024 * 1024  # 1 MiB: a whois is a few KiB, a cert pair ~4 KiB
#: How many of this node's certificate names are kept (a node has one or two).
MAX_CERT_DOMAINS: Final = 32
_READ_SIZE: Final = 65536
_MAX_DETAIL_BODY: Final = 200  # how much of a (non-secret) error body goes into a log detail

__all__ = [
    "DEFAULT_MAX_RESPONSE",
    "LOCALAPI_HOST",
    "MAX_CERT_DOMAINS",
    "BadAddress",
    "CertUnavailable",
    "LocalAPIClient",
    "LocalAPIResponse",
    "LocalAPIUnavailable",
    "MalformedResponse",
    "PeerNotFound",
    "decode_json_object",
    "format_go_duration",
    "format_whois_addr",
    "split_pem_pair",
]


# ---------------------------------------------------------------------------
# Errors


class LocalAPIUnavailable(IdentityError):
    """tailscaled could not be asked or gave no usable answer (fail closed, 08004)."""

    def __init__(self, detail: str) -> None:
        super().__init__(errors.identity_unavailable("tailscaled", detail=detail))


class PeerNotFound(IdentityError):
    """The address is not a known tailnet peer (28000)."""

    def __init__(self, detail: str) -> None:
        super().__init__(errors.unknown_peer(detail=detail))


class BadAddress(IdentityError):
    """The peer address is not a valid IP:port (tailscaled's 400, or caught before asking)."""

    def __init__(self, detail: str) -> None:
        super().__init__(errors.unknown_peer(detail=detail))


class MalformedResponse(IdentityError):
    """tailscaled answered, but not with what the LocalAPI contract promises (08004)."""

    def __init__(self, detail: str) -> None:
        super().__init__(errors.identity_unavailable("tailscaled", detail=detail))


class CertUnavailable(IdentityError):
    """tailscaled refused or failed to hand out a certificate pair.

    ``status`` is the HTTP status (None when the request was never sent, e.g.
    an invalid domain name); ``retry_after`` is the delay in seconds tailscaled
    asked for with a 429, when it gave a parseable one.
    """

    def __init__(
        self, detail: str, *, status: int | None, retry_after: float | None = None
    ) -> None:
        super().__init__(
            errors.identity_unavailable("tailscaled certificate service", detail=detail)
        )
        self.status = status
        self.retry_after = retry_after


# ---------------------------------------------------------------------------
# Pure helpers


def format_whois_addr(host: str, port: int) -> str:
    """The ``IP:PORT`` text tailscaled expects for ``whois?addr=`` (not yet query-escaped).

    IPv6 is bracketed, an IPv4-mapped IPv6 address is unmapped to plain IPv4,
    and a zone (``%eth0``) is dropped (tailnet addresses carry none). Raises
    :class:`BadAddress` for anything that is not an IP literal and a port.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise BadAddress(f"invalid peer port {port!r}")
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.partition("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise BadAddress(f"peer host {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"{ip.ipv4_mapped}:{port}"
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


def format_go_duration(seconds: float) -> str:
    """Seconds as a Go ``time.ParseDuration`` string: 2592000 → ``720h``, 90 → ``1m30s``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a finite number of seconds >= 0, not {seconds!r}")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    out = ""
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if secs or ms:
        out += f"{secs}" + (f".{ms:03d}".rstrip("0") if ms else "") + "s"
    return out


_PEM_BLOCK: Final = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(?:[A-Za-z0-9+/=:,\- \t]*\r?\n)*?-----END \1-----\r?\n?"
)
_KEY_TYPES: Final = frozenset({b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY"})


def split_pem_pair(body: bytes) -> tuple[bytes, bytes]:
    """Split tailscaled's ``type=pair`` answer into (key_pem, cert_chain_pem) by block type.

    Exactly one private-key block and at least one ``CERTIFICATE`` block are
    required; the certificates keep their order. Raises
    :class:`MalformedResponse` otherwise (the message never quotes the body:
    it may hold a private key).
    """
    keys: list[bytes] = []
    certs: list[bytes] = []
    other: list[str] = []
    for match in _PEM_BLOCK.finditer(body):
        block = match.group(0)
        if not block.endswith(b"\n"):
            block += b"\n"
        kind = match.group(1)
        if kind in _KEY_TYPES:
            keys.append(block)
        elif kind == b"CERTIFICATE":
            certs.append(block)
        else:
            other.append(kind.decode("ascii"))
    if len(keys) != 1 or not certs:
        raise MalformedResponse(
            f"certificate pair from tailscaled has {len(keys)} private key block(s) and "
            f"{len(certs)} certificate block(s)"
            + (f" (and unexpected blocks: {', '.join(other)})" if other else "")
            + "; expected exactly one key and at least one certificate"
        )
    return keys[0], b"".join(certs)


def _parse_retry_after(value: bytes | None) -> float | None:
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    # ASCII digits only ("²".isdigit() is true) and a bounded length (int() refuses
    # over 4300 digits, float() over ~308): anything else is not a delay we can use.
    if text.isascii() and text.isdigit():
        return float(int(text)) if len(text) <= 12 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _body_excerpt(body: bytes) -> str:
    text = body[:_MAX_DETAIL_BODY].decode("utf-8", "replace").strip()
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text + ("…" if len(body) > _MAX_DETAIL_BODY else ""))


# ---------------------------------------------------------------------------
# The client


@frozen
class LocalAPIResponse:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


DEFAULT_MAX_CONCURRENT = 64
#: Idle keep-alive connections kept for the next requests.
DEFAULT_MAX_IDLE = 8


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer: retry on a new one."""


class LocalAPIClient:
    """Talks to tailscaled at ``socket_path``; every call finishes within ``timeout`` seconds."""

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float,
        max_response: int = DEFAULT_MAX_RESPONSE,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_idle: int = DEFAULT_MAX_IDLE,
    ) -> None:
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(
                f"LocalAPI timeout must be a positive number of seconds, not {timeout!r}"
            )
        if max_response <= 0:
            raise ValueError(f"max_response must be positive, not {max_response!r}")
        self.socket_path = socket_path
        self.timeout = timeout
        self.max_response = max_response
        # At most this many requests in flight: a burst of connects must not overflow
        # tailscaled's listen backlog; waiting for a slot counts against ``timeout``.
        self._in_flight = trio.Semaphore(max_concurrent)
        # Keep-alive: connections whose last exchange ended cleanly, newest last. Saves
        # the connect (and tailscaled's accept) on every whois of a connect burst.
        self._idle: list[tuple[trio.SocketStream, h11.Connection]] = []
        self._max_idle = max_idle

    def __repr__(self) -> str:
        return f"LocalAPIClient({self.socket_path!r}, timeout={self.timeout!r})"

    async def whois_raw(self, host: str, port: int) -> dict[str, Any]:
        """``GET /localapi/v0/whois`` for the peer at (host, port): the decoded JSON object.

        Raises :class:`PeerNotFound` (404), :class:`BadAddress` (400 or an
        address that is not an IP), :class:`MalformedResponse` (not a JSON
        object) or :class:`LocalAPIUnavailable` (everything else).
        """
        body = await self.whois_body(host, port)
        return decode_json_object(body, f"tailscaled whois {format_whois_addr(host, port)}")

    async def whois_body(self, host: str, port: int) -> bytes:
        """``GET /localapi/v0/whois`` for the peer at (host, port): the 200 answer's body, not
        yet decoded (:meth:`whois_raw` decodes it). Raises as :meth:`whois_raw`, except
        :class:`MalformedResponse` for the body."""
        addr = format_whois_addr(host, port)
        target = "/localapi/v0/whois?addr=" + urllib.parse.quote(addr, safe="")
        resp = await self.get(target)
        if resp.status == 404:
            raise PeerNotFound(f"tailscaled whois {addr}: 404 {_body_excerpt(resp.body)}")
        if resp.status == 400:
            raise BadAddress(f"tailscaled whois {addr}: 400 {_body_excerpt(resp.body)}")
        if resp.status != 200:
            raise LocalAPIUnavailable(
                f"tailscaled whois {addr}: HTTP {resp.status} {_body_excerpt(resp.body)}"
            )
        return resp.body

    async def cert_pair(self, domain: str, *, min_validity: float | None) -> tuple[bytes, bytes]:
        """``GET /localapi/v0/cert/<domain>?type=pair``: (key_pem, cert_chain_pem).

        ``min_validity`` (seconds) asks tailscaled to renew first if the cached
        certificate expires sooner. Fetching may take seconds when tailscaled
        must obtain a certificate: callers cache the result. Raises
        :class:`CertUnavailable` for any non-200 answer (``retry_after`` set
        from a 429's ``Retry-After``), :class:`MalformedResponse` for a body
        without exactly one key and a chain, :class:`LocalAPIUnavailable` when
        tailscaled cannot be reached.
        """
        if not _valid_domain(domain):
            raise CertUnavailable(
                f"refusing to ask tailscaled for a certificate for invalid domain {domain[:100]!r}",
                status=None,
            )
        query: dict[str, str] = {"type": "pair"}
        if min_validity is not None:
            query["min_validity"] = format_go_duration(min_validity)
        target = (
            "/localapi/v0/cert/"
            + urllib.parse.quote(domain, safe="")
            + "?"
            + urllib.parse.urlencode(query)
        )
        resp = await self.get(target)
        if resp.status != 200:
            retry_after = (
                _parse_retry_after(resp.header(b"retry-after")) if resp.status == 429 else None
            )
            detail = f"tailscaled cert {domain}: HTTP {resp.status} {_body_excerpt(resp.body)}"
            if retry_after is not None:
                detail += f" (retry after {retry_after:g}s)"
            raise CertUnavailable(detail, status=resp.status, retry_after=retry_after)
        return split_pem_pair(resp.body)

    async def cert_domains(self) -> tuple[str, ...]:
        """``GET /localapi/v0/status?peers=false``: the DNS names this node can get
        certificates for (its ``CertDomains``), lower case without the trailing dot, in
        tailscaled's order, at most ``MAX_CERT_DOMAINS``. Empty when HTTPS certificates are
        off for the tailnet. Raises :class:`MalformedResponse` for a body that is not a
        status object and :class:`LocalAPIUnavailable` for any non-200 answer or transport
        fault.
        """
        resp = await self.get("/localapi/v0/status?peers=false")
        if resp.status != 200:
            raise LocalAPIUnavailable(
                f"tailscaled status: HTTP {resp.status} {_body_excerpt(resp.body)}"
            )
        body = decode_json_object(resp.body, "tailscaled status")
        raw = body.get("CertDomains")
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
            raise MalformedResponse("tailscaled status: CertDomains is not a list of names")
        names: list[str] = []
        for domain in raw:
            name = domain.rstrip(".").lower()
            if _valid_domain(name) and name not in names:
                names.append(name)
            if len(names) == MAX_CERT_DOMAINS:
                break
        return tuple(names)

    async def get(self, target: str) -> LocalAPIResponse:
        """One bounded GET (on a kept-alive connection when one is idle). Transport faults raise
        LocalAPIUnavailable."""
        what = f"GET {target.partition('?')[0]} on {self.socket_path}"
        try:
            with trio.fail_after(self.timeout):
                async with self._in_flight:
                    return await self._get(target, what)
        except trio.TooSlowError:
            raise LocalAPIUnavailable(
                f"{what}: no complete answer within {self.timeout:g}s"
            ) from None

    async def aclose(self) -> None:
        """Close the idle keep-alive connections."""
        idle, self._idle = self._idle, []
        for stream, _ in idle:
            await stream.aclose()

    async def _get(self, target: str, what: str) -> LocalAPIResponse:
        if self._idle:
            stream, conn = self._idle.pop()
            try:
                return await self._exchange(stream, conn, target, what, reused=True)
            except _Stale:
                pass  # tailscaled closed it while it was idle: once more, on a new connection
        try:
            stream = await trio.open_unix_socket(self.socket_path)
        except OSError as exc:
            raise LocalAPIUnavailable(f"connect to {self.socket_path} failed: {exc}") from None
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
        return await self._exchange(stream, conn, target, what, reused=False)

    async def _exchange(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        target: str,
        what: str,
        *,
        reused: bool,
    ) -> LocalAPIResponse:
        """One GET on ``stream``; keeps the connection for the next call when it ended
        cleanly. On a ``reused`` connection, a failure before any answer byte raises
        :class:`_Stale` (a GET is safe to send again)."""
        keep = False
        try:
            request = h11.Request(
                method="GET",
                target=target,
                headers=[
                    ("Host", LOCALAPI_HOST),
                    ("User-Agent", "waypoint"),
                    ("Accept", "*/*"),
                ],
            )
            try:
                payload = (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                await stream.send_all(payload)
            except (OSError, trio.BrokenResourceError) as exc:
                if reused:
                    raise _Stale from None
                cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
                raise LocalAPIUnavailable(
                    f"{what}: sending the request failed: {cause or exc}"
                ) from None
            response = await self._read_response(conn, stream, what, stale_ok=reused)
            if (
                conn.our_state is h11.DONE
                and conn.their_state is h11.DONE
                and len(self._idle) < self._max_idle
            ):
                conn.start_next_cycle()
                keep = True
            return response
        finally:
            if keep:
                self._idle.append((stream, conn))
            else:
                await stream.aclose()

    async def _read_response(
        self, conn: h11.Connection, stream: trio.SocketStream, what: str, *, stale_ok: bool
    ) -> LocalAPIResponse:
        status: int | None = None
        headers: tuple[tuple[bytes, bytes], ...] = ()
        body = bytearray()
        received = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise LocalAPIUnavailable(
                    f"{what}: malformed HTTP from tailscaled: {exc}"
                ) from None
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(_READ_SIZE)
                except (OSError, trio.BrokenResourceError) as exc:
                    if stale_ok and received == 0:
                        raise _Stale from None
                    raise LocalAPIUnavailable(
                        f"{what}: reading the answer failed: {exc.__cause__ or exc}"
                    ) from None
                if not data and stale_ok and received == 0:
                    raise _Stale
                received += len(data)
                if received > self.max_response + 64 * 1024:
                    raise MalformedResponse(
                        f"{what}: answer exceeds {self.max_response} bytes; not reading further"
                    )
                conn.receive_data(data)  # b"" marks EOF; h11 then reports a truncated body
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
                continue
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_response:
                    raise MalformedResponse(
                        f"{what}: answer body exceeds {self.max_response} bytes; not reading further"
                    )
                continue
            if isinstance(event, h11.EndOfMessage):
                assert status is not None  # h11 guarantees Response before EndOfMessage
                return LocalAPIResponse(status, headers, bytes(body))
            if isinstance(event, h11.ConnectionClosed):
                raise LocalAPIUnavailable(
                    f"{what}: tailscaled closed the connection without an answer"
                )
            raise LocalAPIUnavailable(f"{what}: unexpected HTTP event {type(event).__name__}")


_DOMAIN_LABEL: Final = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _valid_domain(domain: str) -> bool:
    if not domain or len(domain) > 253 or not domain.isascii():
        return False
    return all(_DOMAIN_LABEL.match(label) for label in domain.rstrip(".").split("."))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def decode_json_object(body: bytes, what: str) -> dict[str, Any]:
    """``body`` as a JSON object; :class:`MalformedResponse` (``what`` says whose) if it is
    not valid UTF-8 JSON, holds a non-JSON constant (``NaN``, ``Infinity``) or is not an
    object."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedResponse(f"{what}: answer is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedResponse(f"{what}: answer is a JSON {json_type(value)}, not an object")
    return value
