"""Client-side TLS for listeners: certificate choice by SNI, Tailscale certificates, ClientHello peeking.

Certificate choice (docs/localapi.md): the file certificate when the SNI matches one of its names or no
SNI was sent; with ``use_tailscale_tls``, a Tailscale certificate fetched through the LocalAPI
for a name this node can hold (cached, renewed ahead of expiry; a failed fetch falls back to a
still-valid cached one). ALPN ``postgresql`` is offered on every context.

The server name arrives before anything is known about the peer, so it never creates state or
a request of its own: the node's certificate names come from tailscaled's status (asked at
most once per ``NAMES_REFRESH``, whatever peers send), a certificate is fetched only for one of
them, and every per-name table is keyed by those names alone.
"""

from __future__ import annotations

import datetime as _dt
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio
from cryptography import x509

from waypoint.config.model import ListenerConfig
from waypoint.observability.log import get_logger

log = get_logger("tls")

ALPN_POSTGRESQL = "postgresql"
MAX_CLIENT_HELLO = 64 * 1024
# Renew a cached Tailscale certificate when it expires sooner than this.
RENEW_BEFORE = 14 * 24 * 3600.0
# The min_validity we ask tailscaled for (it renews first if the cached one expires sooner).
MIN_VALIDITY = 30 * 24 * 3600.0
# After a failed fetch, handshakes with that name do not ask tailscaled again for this long
# (or for its Retry-After, when rate-limited), so a failing tailscaled is not hammered.
FETCH_BACKOFF = 30.0
# The node's certificate names (tailscaled's status) are asked again after this long; after a
# failed status request, after FETCH_BACKOFF. Server names never trigger more requests.
NAMES_REFRESH = 60.0
# At most this many certificate names are kept (a node has one or two): every per-name table
# below is bounded by it.
MAX_OWN_NAMES = 32

CertFetcher = Callable[[str], Awaitable[tuple[bytes, bytes]]]
#: The DNS names this node can get certificates for (LocalAPIClient.cert_domains).
CertDomains = Callable[[], Awaitable[Sequence[str]]]


class ClientHelloError(ValueError):
    pass


def client_hello_length(buf: bytes | bytearray) -> int | None:
    """How many bytes of ``buf`` hold the complete ClientHello handshake message (which may span
    several TLS records), or None if more are needed. Raises ClientHelloError if ``buf`` is not a
    TLS handshake."""
    return ClientHelloScanner().feed(buf)


class ClientHelloScanner:
    """:func:`client_hello_length` for bytes that arrive in pieces: each record is read once,
    however the bytes are cut. (Reading the whole buffer again for each piece is quadratic: a
    peer sending 64 KiB as one-byte records, one at a time, kept the event loop busy for the
    whole handshake timeout.) ``buffer`` holds every byte fed."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        #: Where the next record starts (the records before it were read).
        self._offset = 0
        #: The handshake message's first four bytes (type and length), and how many bytes of
        #: it the records read hold.
        self._header = bytearray()
        self._have = 0

    def feed(self, data: bytes | bytearray) -> int | None:
        """Add ``data``: the ClientHello's length in ``buffer`` once it is complete, else None.
        Raises ClientHelloError as soon as the bytes are not a ClientHello."""
        buf = self.buffer
        buf += data
        while len(buf) >= self._offset + 5:
            offset = self._offset
            if buf[offset] != 0x16:
                raise ClientHelloError("not a TLS handshake record")
            rec_len = int.from_bytes(buf[offset + 3 : offset + 5], "big")
            if rec_len == 0 or rec_len > 16384 + 2048:
                raise ClientHelloError(f"bad TLS record length {rec_len}")
            end = offset + 5 + rec_len
            if len(buf) < end:
                return None
            missing = 4 - len(self._header)
            if missing > 0:
                self._header += buf[offset + 5 : offset + 5 + min(missing, rec_len)]
            self._have += rec_len
            self._offset = end
            if len(self._header) == 4:
                if self._header[0] != 0x01:
                    raise ClientHelloError("first handshake message is not a ClientHello")
                need = 4 + int.from_bytes(self._header[1:4], "big")
                if need > MAX_CLIENT_HELLO:
                    raise ClientHelloError("ClientHello too large")
                if self._have >= need:
                    return end
            if end > MAX_CLIENT_HELLO:
                raise ClientHelloError("ClientHello too large")
        return None


@attrs.frozen
class ClientHelloInfo:
    server_name: str | None
    alpn: tuple[str, ...]


def parse_client_hello(buf: bytes | bytearray) -> ClientHelloInfo:
    """SNI and ALPN offers of a complete ClientHello (as returned by :func:`client_hello_length`)."""
    handshake = bytearray()
    offset = 0
    while offset + 5 <= len(buf):
        rec_len = int.from_bytes(buf[offset + 3 : offset + 5], "big")
        handshake += buf[offset + 5 : offset + 5 + rec_len]
        offset += 5 + rec_len
    try:
        body_len = int.from_bytes(handshake[1:4], "big")
        body = memoryview(bytes(handshake[4 : 4 + body_len]))
        p = 2 + 32  # client_version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        if p >= len(body):
            return ClientHelloInfo(None, ())
        ext_end = p + 2 + int.from_bytes(body[p : p + 2], "big")
        p += 2
        server_name: str | None = None
        alpn: list[str] = []
        while p + 4 <= ext_end and p + 4 <= len(body):
            ext_type = int.from_bytes(body[p : p + 2], "big")
            ext_len = int.from_bytes(body[p + 2 : p + 4], "big")
            data = body[p + 4 : p + 4 + ext_len]
            p += 4 + ext_len
            if ext_type == 0 and len(data) >= 5:  # server_name
                q = 2
                while q + 3 <= len(data):
                    name_type = data[q]
                    name_len = int.from_bytes(data[q + 1 : q + 3], "big")
                    name = bytes(data[q + 3 : q + 3 + name_len])
                    q += 3 + name_len
                    if name_type == 0:
                        server_name = name.decode("ascii", "replace").rstrip(".").lower()
                        break
            elif ext_type == 16 and len(data) >= 2:  # ALPN
                q = 2
                while q < len(data):
                    n = data[q]
                    alpn.append(bytes(data[q + 1 : q + 1 + n]).decode("ascii", "replace"))
                    q += 1 + n
        return ClientHelloInfo(server_name, tuple(alpn))
    except (IndexError, ValueError) as exc:
        raise ClientHelloError(f"malformed ClientHello: {exc}") from exc


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    return ctx


def _cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.extend(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return tuple(names)


def _name_matches(sni: str, names: tuple[str, ...]) -> bool:
    for name in names:
        if name == sni:
            return True
        if name.startswith("*.") and "." in sni and sni.split(".", 1)[1] == name[2:]:
            return True
    return False


def _context_from_pem(key_pem: bytes, chain_pem: bytes) -> ssl.SSLContext:
    ctx = _server_context()
    # ssl can only load certificates from files: write them to a private temp dir briefly.
    with tempfile.TemporaryDirectory(prefix="waypoint-cert-") as tmp:
        os.chmod(tmp, 0o700)
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "wb") as f:
            f.write(chain_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


@attrs.define
class _CachedCert:
    context: ssl.SSLContext
    not_after: float


class ClientTLS:
    """Chooses the server certificate for a client connection by SNI.

    With ``use_tailscale_tls``, ``fetch_cert`` fetches a certificate pair for one name and
    ``cert_domains`` lists the names this node can hold; both are required.
    """

    def __init__(
        self,
        listener: ListenerConfig,
        *,
        fetch_cert: CertFetcher | None = None,
        cert_domains: CertDomains | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.listener = listener
        self._fetch = fetch_cert if listener.use_tailscale_tls else None
        if self._fetch is not None and cert_domains is None:
            raise ValueError("fetching Tailscale certificates needs the node's cert_domains")
        self._cert_domains = cert_domains
        self._clock = clock or (lambda: _dt.datetime.now(_dt.UTC).timestamp())
        self._file_ctx: ssl.SSLContext | None = None
        self._file_names: tuple[str, ...] = ()
        # The node's certificate names, and until when they are believed (a clock time).
        self._own_names: frozenset[str] = frozenset()
        self._own_until = float("-inf")
        self._own_lock = trio.Lock()
        # Keyed by the node's own names only (at most MAX_OWN_NAMES entries each).
        self._ts_cache: dict[str, _CachedCert] = {}
        self._ts_locks: dict[str, trio.Lock] = {}
        self._ts_backoff: dict[str, float] = {}
        if listener.cert_file and listener.key_file:
            ctx = _server_context()
            ctx.load_cert_chain(listener.cert_file, listener.key_file)
            self._file_ctx = ctx
            with open(listener.cert_file, "rb") as f:
                self._file_names = _cert_names(x509.load_pem_x509_certificate(f.read()))

    @property
    def enabled(self) -> bool:
        return self.listener.tls_mode != "off" and (
            self._file_ctx is not None or self._fetch is not None
        )

    async def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context to answer a ClientHello with this SNI, or None if no certificate fits."""
        if self._file_ctx is not None and (
            server_name is None or _name_matches(server_name, self._file_names)
        ):
            return self._file_ctx
        if self._fetch is not None and server_name:
            ctx = await self._tailscale_context(server_name)
            if ctx is not None:
                return ctx
        return self._file_ctx

    async def own_names(self) -> frozenset[str]:
        """The names this node can get certificates for, as tailscaled last said (asked
        again at most once per ``NAMES_REFRESH``; after a failure, the names known before,
        for ``FETCH_BACKOFF``)."""
        assert self._cert_domains is not None
        if self._own_until > self._clock():
            return self._own_names
        async with self._own_lock:
            now = self._clock()
            if self._own_until > now:
                return self._own_names
            try:
                names = await self._cert_domains()
            except Exception as exc:
                self._own_until = now + FETCH_BACKOFF
                log.warning(
                    "tailscale_cert_domains_failed", error=str(exc), retry_in=FETCH_BACKOFF
                )
                return self._own_names
            self._own_names = frozenset(n.rstrip(".").lower() for n in names[:MAX_OWN_NAMES])
            self._own_until = now + NAMES_REFRESH
            for table in (self._ts_cache, self._ts_locks, self._ts_backoff):
                for name in [n for n in table if n not in self._own_names]:
                    del table[name]
            return self._own_names

    async def _tailscale_context(self, domain: str) -> ssl.SSLContext | None:
        assert self._fetch is not None
        now = self._clock()
        cached = self._ts_cache.get(domain)
        if cached is not None and cached.not_after - now > RENEW_BEFORE:
            return cached.context
        if domain not in await self.own_names():
            # Not a name this node can hold: tailscaled would refuse it. No request, no entry.
            return None
        lock = self._ts_locks.setdefault(domain, trio.Lock())
        async with lock:
            cached = self._ts_cache.get(domain)
            now = self._clock()
            if cached is not None and cached.not_after - now > RENEW_BEFORE:
                return cached.context
            if self._ts_backoff.get(domain, 0.0) > now:
                return cached.context if cached is not None and cached.not_after > now else None
            try:
                key_pem, chain_pem = await self._fetch(domain)
                ctx = _context_from_pem(key_pem, chain_pem)
                leaf = x509.load_pem_x509_certificate(chain_pem)
                not_after = leaf.not_valid_after_utc.timestamp()
            except Exception as exc:
                retry_after = getattr(exc, "retry_after", None)
                backoff = max(FETCH_BACKOFF, float(retry_after or 0.0))
                if domain in self._own_names:  # still the node's (the names may have changed)
                    self._ts_backoff[domain] = now + backoff
                log.warning(
                    "tailscale_cert_fetch_failed", domain=domain, error=str(exc), retry_in=backoff
                )
                if cached is not None and cached.not_after > now:
                    return cached.context
                return None
            if domain in self._own_names:
                self._ts_cache[domain] = _CachedCert(ctx, not_after)
            self._ts_backoff.pop(domain, None)
            log.info(
                "tailscale_cert_loaded",
                domain=domain,
                not_after=leaf.not_valid_after_utc.isoformat(),
            )
            return ctx
