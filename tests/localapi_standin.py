"""A faithful stand-in for tailscaled's LocalAPI, for tests and the benchmark harness.

An HTTP/1.1 server on a unix socket (trio + h11) that behaves like tailscaled
where Waypoint can see it (docs/localapi.md):

- every request must carry ``Host: local-tailscaled.sock`` and no ``Referer``
  or ``Origin``, else ``403 invalid localapi request\\n``;
- ``GET /localapi/v0/whois?addr=IP:PORT`` answers from a table keyed by peer
  IP (the port is ignored; an IPv4-mapped IPv6 address is *not* unmapped, as
  tailscaled does not either), with the full body shape (Node, UserProfile,
  CapMap, extra fields), tab-indented JSON without a trailing newline;
  ``404 no match for IP:port\\n`` for unknown peers, ``400 invalid 'addr'
  parameter\\n`` / ``400 missing 'addr' parameter\\n`` for bad input;
- bodies up to 2048 bytes carry ``Content-Length``, larger ones go
  ``Transfer-Encoding: chunked``, as Go's net/http does;
- ``GET /localapi/v0/cert/<domain>?type=pair&min_validity=...`` serves an EC
  key and certificate chain from a trustme CA for configured domains (500 for
  others); switches for 403 and 429 + ``Retry-After``;
- ``GET /localapi/v0/status`` (``?peers=false`` honoured: no ``Peer`` map) answers this
  node's status: ``Self`` (its ``DNSName``), ``MagicDNSSuffix``, ``CurrentTailnet`` and
  ``CertDomains``, the names it can get certificates for (the configured cert domains;
  ``null`` when there are none, as when HTTPS is off for the tailnet); ``status_extra``
  replaces fields of it, ``status_fault`` (a fault kind, below) makes it fail alone;
- fault switches, global or per peer IP: ``hang`` (never answer), ``status500``,
  ``status400`` (tailscaled's answer to a bad address, for any address),
  ``malformed_json``, ``close_mid_response`` (headers and half a body, then
  close), ``bad_http`` (a garbage status line).

In tests::

    async with run_standin(tmp_path) as standin:
        standin.set_peer("127.0.0.2", login="alice@example.com", node="alice-laptop",
                         rules=[{"backends": {...}}])
        client = LocalAPIClient(standin.socket_path, timeout=1.0)
        ...

``set_peer`` may be called again at any time (grants change while sessions
are live); ``standin.requests`` logs ``"GET <target>"`` for every request
(``whois_count``, ``cert_count`` and ``status_count`` count them by kind).

As a process (subprocess end-to-end tests, the benchmark harness)::

    python tests/localapi_standin.py --socket /tmp/ts/tailscaled.sock --peers peers.json

The peers file is JSON::

    {
      "capability": "redo.com/cap/waypoint",      // optional, this default
      "fault": null,                              // optional global fault
      "cert_domains": ["waypoint.tail1234.ts.net"],   // optional
      "peers": [
        {"ip": "127.0.0.2", "login": "alice@example.com", "node": "alice-laptop",
         "tags": [], "rules": [{"backends": {"pg-main": {"pg": {...}}}}],
         "fault": null}                           // optional per-peer fault
      ]
    }

It is re-read on SIGHUP and whenever its mtime (or size) changes (polled every
0.1 s), so a test can change grants by rewriting the file (write a temp file
and rename it over, so a half-written file is never read; a file that does not
parse is reported on stderr and the previous table kept). Once listening, the
process prints ``ready <socket path>`` on stdout. With ``--ca-cert-out PATH``
it writes the certificate authority's PEM there, for clients to trust.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import os
import signal
import stat
import sys
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h11
import trio
import trustme
from cryptography.hazmat.primitives import serialization

LOCALAPI_HOST = "local-tailscaled.sock"
DEFAULT_CAPABILITY = "redo.com/cap/waypoint"
DEFAULT_TAILNET = "tail1234.ts.net"
TAGGED_DEVICES = "tagged-devices"
CHUNKING_THRESHOLD = 2048  # Go's net/http bufferBeforeChunkingSize
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, keep a margin

Fault = Literal[
    "hang", "status500", "status400", "malformed_json", "close_mid_response", "bad_http"
]
FAULTS: frozenset[str] = frozenset(
    {"hang", "status500", "status400", "malformed_json", "close_mid_response", "bad_http"}
)
CertFault = Literal["forbidden", "rate_limited"]

_UNSET: Any = object()
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Peer:
    """One peer of the table; replaced whole (``set_peer``) when anything about it changes."""

    ip: IPAddress
    login: str
    node: str
    tags: tuple[str, ...]
    rules: list[Any]
    capability: str
    computed_name: bool
    cap_map: Any  # _UNSET: {capability: rules}; else served verbatim (None → null)
    node_id: int
    user_id: int
    tailnet: str

    def body(self) -> dict[str, Any]:
        fqdn = f"{self.node}.{self.tailnet}."
        if isinstance(self.ip, ipaddress.IPv4Address):
            addresses = [f"{self.ip}/32", f"fd7a:115c:a1e0::{self.node_id % 0xFFFF:x}/128"]
        else:
            addresses = [
                f"100.64.{self.node_id % 250}.{self.node_id % 200 + 1}/32",
                f"{self.ip}/128",
            ]
        node: dict[str, Any] = {
            "ID": self.node_id,
            "StableID": f"n{self.node_id:07d}CNTRL",
            "Name": fqdn,
            "User": self.user_id,
            "Sharer": 0,
            "Key": "nodekey:" + f"{self.node_id:064x}",
            "KeyExpiry": "2030-01-01T00:00:00Z",
            "Machine": "mkey:" + f"{self.node_id:064x}",
            "DiscoKey": "discokey:" + f"{self.node_id:064x}",
            "Addresses": addresses,
            "AllowedIPs": addresses,
            "Endpoints": ["192.0.2.10:41641", "[2001:db8::10]:41641"],
            "HomeDERP": 1,
            "Hostinfo": {
                "OS": "linux",
                "Hostname": self.node,
                "Services": [{"Proto": "tcp", "Port": 22}],
                "GoVersion": "go1.24.0",
            },
            "Created": "2024-01-01T00:00:00Z",
            "Cap": 113,
            "Tags": list(self.tags) if self.tags else None,
            "Online": True,
            "MachineAuthorized": True,
            "Capabilities": None,
            "CapMap": {"https://tailscale.com/cap/is-admin": None},
            "ComputedName": self.node if self.computed_name else "",
            "ComputedNameWithHost": self.node if self.computed_name else "",
        }
        profile: dict[str, Any] = {
            "ID": self.user_id,
            "LoginName": self.login,
            "DisplayName": "Tagged Devices"
            if self.login == TAGGED_DEVICES
            else self.login.split("@")[0].title(),
            "ProfilePicURL": "",
            "Roles": [],
        }
        cap_map: Any = (
            {self.capability: list(self.rules)} if self.cap_map is _UNSET else self.cap_map
        )
        return {"Node": node, "UserProfile": profile, "CapMap": cap_map}

    @functools.cached_property
    def whois_json(self) -> bytes:
        """The whois answer's body, serialised once per peer (``set_peer`` makes a new
        :class:`Peer`): tailscaled (Go) answers a whois in about 0.1 ms, and building and
        indenting this JSON again on every request would make the stand-in, not Waypoint,
        the cost of a connection in the benchmark."""
        return json.dumps(self.body(), indent="\t").encode()

    @functools.cached_property
    def whois_answer(self) -> _Answer:
        """The 200 answer to a whois for this peer, with its bytes on the wire made once
        (by h11, as for every other answer)."""
        answer = _Answer(200, self.whois_json, content_type="application/json")
        answer.wire = _wire(answer)
        return answer


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    @property
    def line(self) -> str:
        return f"{self.method} {self.target}"


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    fault: str | None = None  # hang / close_mid_response / bad_http: the transport misbehaves
    #: The whole HTTP/1.1 response as :meth:`LocalAPIStandin._send` writes it (a peer's whois
    #: answer, made once per peer), or None: made on the spot.
    wire: bytes | None = None


def _text(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> _Answer:
    """What Go's http.Error writes."""
    return _Answer(
        status, (message + "\n").encode(), headers=[("X-Content-Type-Options", "nosniff"), *headers]
    )


def _parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.strip())


def _parse_addr_port(value: str) -> IPAddress | None:
    """netip.ParseAddrPort, falling back to a bare address (as tailscaled's whois does)."""
    try:
        if value.startswith("["):
            end = value.index("]")
            rest = value[end + 1 :]
            if not rest.startswith(":") or not rest[1:].isdigit() or int(rest[1:]) > 65535:
                return None
            ip = ipaddress.ip_address(value[1:end])
            return ip if isinstance(ip, ipaddress.IPv6Address) else None
        host, sep, port = value.rpartition(":")
        if sep and "." in host and ":" not in host:
            if not port.isdigit() or int(port) > 65535:
                return None
            return ipaddress.IPv4Address(host)
        return ipaddress.ip_address(value)
    except ValueError:
        return None


class LocalAPIStandin:
    """The fake tailscaled. Start with ``await nursery.start(standin.serve)`` or :func:`run_standin`."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        capability: str = DEFAULT_CAPABILITY,
        tailnet: str = DEFAULT_TAILNET,
        ca: trustme.CA | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        if len(self.socket_path.encode()) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"unix socket path too long ({len(self.socket_path)} bytes): {self.socket_path}"
            )
        self.capability = capability
        self.tailnet = tailnet
        self.ca = ca or trustme.CA()
        self.requests: list[str] = []
        self.recorded: list[RecordedRequest] = []
        self._peers: dict[IPAddress, Peer] = {}
        self._faults: dict[IPAddress | None, str] = {}
        self._cert_domains: set[str] = set()
        self._cert_pems: dict[str, bytes] = {}
        self._cert_fault: tuple[str, str] | None = None
        self._next_id = 1000
        #: Fields that replace those of the status answer (to serve a malformed one).
        self.status_extra: dict[str, Any] = {}
        #: A fault for the status answer alone (``hang``: a tailscaled that accepts and never
        #: answers), independent of the whois faults.
        self.status_fault: Fault | None = None
        #: Connections accepted so far (keep-alive clients reuse theirs).
        self.connections = 0
        #: Close each connection after one answer, as an idle timeout would (the answer
        #: itself still promises keep-alive).
        self.close_after_answer = False

    # -- the test API ------------------------------------------------------

    def set_peer(
        self,
        ip: str,
        *,
        login: str,
        node: str,
        tags: Sequence[str] = (),
        rules: Sequence[Any] = (),
        capability: str | None = None,
        computed_name: bool = True,
        cap_map: Any = _UNSET,
    ) -> None:
        """Add or replace the peer at ``ip``. ``computed_name=False`` serves an empty
        ComputedName (clients must fall back to Name); ``cap_map`` replaces the whole
        CapMap verbatim (``None`` serves ``null``)."""
        key = _parse_ip(ip)
        old = self._peers.get(key)
        if old is not None:
            node_id, user_id = old.node_id, old.user_id
        else:
            self._next_id += 1
            node_id, user_id = self._next_id, 7_000_000 + self._next_id
        self._peers[key] = Peer(
            ip=key,
            login=login,
            node=node,
            tags=tuple(tags),
            rules=[json.loads(json.dumps(r)) for r in rules],  # a private copy
            capability=capability or self.capability,
            computed_name=computed_name,
            cap_map=cap_map if cap_map is _UNSET else json.loads(json.dumps(cap_map)),
            node_id=node_id,
            user_id=user_id,
            tailnet=self.tailnet,
        )

    def remove_peer(self, ip: str) -> None:
        self._peers.pop(_parse_ip(ip), None)

    def set_fault(self, kind: Fault | None, ip: str | None = None) -> None:
        """Make whois misbehave for ``ip`` (or for every request, ``ip=None``); ``kind=None`` clears."""
        key = None if ip is None else _parse_ip(ip)
        if kind is None:
            self._faults.pop(key, None)
            return
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {sorted(FAULTS)}")
        self._faults[key] = kind

    def add_cert_domain(self, name: str) -> None:
        self._cert_domains.add(name)

    def set_cert_fault(self, kind: CertFault | None, *, retry_after: str = "30") -> None:
        """``forbidden`` → 403, ``rate_limited`` → 429 with ``Retry-After: retry_after``."""
        if kind is not None and kind not in ("forbidden", "rate_limited"):
            raise ValueError(f"unknown cert fault {kind!r}")
        self._cert_fault = None if kind is None else (kind, retry_after)

    def cert_count(self) -> int:
        """How many certificate requests arrived (any domain, answered or not)."""
        return sum(1 for rec in self.recorded if rec.target.startswith("/localapi/v0/cert/"))

    def status_count(self) -> int:
        """How many status requests arrived."""
        return sum(
            1 for rec in self.recorded if rec.target.partition("?")[0] == "/localapi/v0/status"
        )

    def whois_count(self, ip: str | None = None) -> int:
        """How many whois requests arrived (for ``ip`` only, when given)."""
        n = 0
        for rec in self.recorded:
            path, _, query = rec.target.partition("?")
            if path != "/localapi/v0/whois":
                continue
            if ip is None:
                n += 1
                continue
            addr = urllib.parse.parse_qs(query).get("addr", [""])[0]
            if _parse_addr_port(addr) == _parse_ip(ip):
                n += 1
        return n

    def replace_table(
        self,
        peers: Iterable[Mapping[str, Any]],
        *,
        fault: Fault | None = None,
        cert_domains: Iterable[str] = (),
    ) -> None:
        """Replace all peers, faults and cert domains at once (the peers-file format)."""
        new = LocalAPIStandin.__new__(LocalAPIStandin)
        new._peers, new._faults, new._next_id = {}, {}, self._next_id
        new.capability, new.tailnet = self.capability, self.tailnet
        for index, spec in enumerate(peers):
            unknown = set(spec) - {"ip", "login", "node", "tags", "rules", "fault", "computed_name"}
            if unknown:
                raise ValueError(f"peers[{index}]: unknown keys {sorted(unknown)}")
            try:
                ip, login, node = spec["ip"], spec["login"], spec["node"]
            except KeyError as exc:
                raise ValueError(f"peers[{index}]: missing key {exc}") from None
            old = self._peers.get(_parse_ip(ip))
            if old is not None:
                new._peers[old.ip] = old
            new.set_peer(
                ip,
                login=login,
                node=node,
                tags=spec.get("tags") or (),
                rules=spec.get("rules") or (),
                computed_name=bool(spec.get("computed_name", True)),
            )
            if spec.get("fault") is not None:
                new.set_fault(spec["fault"], ip)
        if fault is not None:
            new.set_fault(fault)
        self._peers, self._faults, self._next_id = new._peers, new._faults, new._next_id
        self._cert_domains = set(cert_domains)

    # -- serving -----------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[LocalAPIStandin] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``socket_path`` until cancelled; ``task_status.started(self)`` once listening."""
        _unlink_stale_socket(self.socket_path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(self.socket_path)
            sock.listen(0xFFFF)  # the kernel caps it at net.core.somaxconn, as for tailscaled (Go)
            listener = trio.SocketListener(sock)
        except BaseException:
            sock.close()
            raise
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started(self)
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        async with stream:
            conn = h11.Connection(h11.SERVER)
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError
            ):
                while True:
                    request: RecordedRequest | None = None
                    with trio.move_on_after(30):
                        request = await self._read_request(conn, stream)
                    if request is None:
                        return
                    answer = self._answer(request)
                    if answer.wire is not None and self._may_send_made(conn, request):
                        # Exactly what h11 would write (``_wire``); the next request gets a
                        # state machine of its own, fed what already arrived of it.
                        await stream.send_all(answer.wire)
                        data, closed = conn.trailing_data
                        conn = h11.Connection(h11.SERVER)
                        if data:
                            conn.receive_data(bytes(data))
                        if closed:
                            conn.receive_data(b"")  # h11's end of the stream
                        continue
                    if answer.fault == "hang":
                        await trio.sleep_forever()
                    if answer.fault == "bad_http":
                        await stream.send_all(b"HTTP/1.1 two hundred OK\r\nbanana\r\n\r\n")
                        return
                    await self._send(conn, stream, answer)
                    if answer.fault == "close_mid_response" or conn.our_state is not h11.DONE:
                        return
                    if conn.their_state is not h11.DONE or self.close_after_answer:
                        return
                    conn.start_next_cycle()

    def _may_send_made(self, conn: h11.Connection, request: RecordedRequest) -> bool:
        """Whether an answer made in advance may go out as it is: an HTTP/1.1 request read
        to its end that keeps the connection alive (otherwise h11 frames the answer)."""
        if self.close_after_answer or conn.their_state is not h11.DONE:
            return False
        if conn.their_http_version != b"1.1":
            return False
        return not any(
            k.lower() == "connection" and "close" in v.lower() for k, v in request.headers
        )

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> RecordedRequest | None:
        request: h11.Request | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                with contextlib.suppress(h11.LocalProtocolError):
                    await self._send(conn, stream, _text(400, "bad request"))
                return None
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Request):
                request = event
                continue
            if isinstance(event, h11.EndOfMessage) and request is not None:
                rec = RecordedRequest(
                    request.method.decode("ascii", "replace"),
                    request.target.decode("ascii", "replace"),
                    tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers),
                )
                self.requests.append(rec.line)
                self.recorded.append(rec)
                return rec
            if isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, answer: _Answer) -> None:
        body = answer.body
        headers = _headers(answer)
        chunked = len(body) > CHUNKING_THRESHOLD
        if answer.fault == "close_mid_response":
            headers.append(("Content-Length", str(len(body))))
            out = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
            await stream.send_all(out + body[: len(body) // 2])
            return
        headers.append(
            ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))
        )
        out = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
        if chunked:
            await stream.send_all(out)
            for start in range(0, len(body), CHUNKING_THRESHOLD):
                await stream.send_all(
                    conn.send(h11.Data(data=body[start : start + CHUNKING_THRESHOLD])) or b""
                )
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        else:
            if body:
                out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)

    # -- the LocalAPI ------------------------------------------------------

    def _answer(self, req: RecordedRequest) -> _Answer:
        headers = {k.lower(): v for k, v in req.headers}
        if headers.get("host") != LOCALAPI_HOST or headers.get("referer") or headers.get("origin"):
            return _text(403, "invalid localapi request")
        path, _, query = req.target.partition("?")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        if path == "/localapi/v0/whois":
            if req.method != "GET":
                return _text(405, "want GET")
            return self._whois(params)
        if path == "/localapi/v0/status":
            if req.method != "GET":
                return _text(405, "want GET")
            return self._status(params)
        if path.startswith("/localapi/v0/cert/"):
            return self._cert(urllib.parse.unquote(path[len("/localapi/v0/cert/") :]), params)
        return _text(404, "404 page not found")

    def _whois(self, params: dict[str, list[str]]) -> _Answer:
        global_fault = self._faults.get(None)
        values = params.get("addr")
        if not values or not values[0]:
            return self._faulty(global_fault) or _text(400, "missing 'addr' parameter")
        ip = _parse_addr_port(values[0])
        if ip is None:
            return self._faulty(global_fault) or _text(400, "invalid 'addr' parameter")
        fault = self._faulty(self._faults.get(ip) or global_fault)
        if fault is not None:
            return fault
        peer = self._peers.get(ip)
        if peer is None:
            return _text(404, "no match for IP:port")
        return peer.whois_answer

    def _status(self, params: dict[str, list[str]]) -> _Answer:
        """This node's status (ipnstate.Status), the fields a client may read and some more."""
        fault = self._faulty(self.status_fault)
        if fault is not None:
            return fault
        domains = sorted(self._cert_domains)
        dns_name = (domains[0] if domains else f"waypoint.{self.tailnet}") + "."
        ips = ["100.100.1.1", "fd7a:115c:a1e0::1"]
        body: dict[str, Any] = {
            "Version": "1.80.0-standin",
            "TUN": True,
            "BackendState": "Running",
            "HaveNodeKey": True,
            "AuthURL": "",
            "TailscaleIPs": ips,
            "Self": {
                "ID": "nSELF0000CNTRL",
                "PublicKey": "nodekey:" + "0" * 64,
                "HostName": dns_name.split(".", 1)[0],
                "DNSName": dns_name,
                "OS": "linux",
                "UserID": 7_000_001,
                "TailscaleIPs": ips,
                "AllowedIPs": [f"{ips[0]}/32", f"{ips[1]}/128"],
                "Tags": ["tag:waypoint"],
                "Online": True,
                "InNetworkMap": True,
                "InMagicSock": False,
                "InEngine": False,
            },
            "Health": [],
            "MagicDNSSuffix": self.tailnet,
            "CurrentTailnet": {
                "Name": "example.com",
                "MagicDNSSuffix": self.tailnet,
                "MagicDNSEnabled": True,
            },
            "CertDomains": domains or None,
            "User": {"7000001": {"ID": 7_000_001, "LoginName": "tagged-devices"}},
            "ClientVersion": None,
        }
        if (params.get("peers") or ["true"])[0] != "false":
            body["Peer"] = {}
        body.update(json.loads(json.dumps(self.status_extra)))
        return _Answer(200, json.dumps(body, indent="\t").encode(), content_type="application/json")

    @staticmethod
    def _faulty(kind: str | None) -> _Answer | None:
        if kind is None:
            return None
        if kind == "status500":
            return _text(500, "internal error: the stand-in was told to fail")
        if kind == "status400":
            return _text(400, "invalid 'addr' parameter")
        if kind == "malformed_json":
            return _Answer(
                200,
                b'{\n\t"Node": {\n\t\t"ID": 1,\n\t\t"Name": "x.',
                content_type="application/json",
            )
        filler = json.dumps({"Node": {"ID": 1, "Padding": "x" * 200}}, indent="\t").encode()
        return _Answer(200, filler, content_type="application/json", fault=kind)

    def _cert(self, domain: str, params: dict[str, list[str]]) -> _Answer:
        if self._cert_fault is not None:
            kind, retry_after = self._cert_fault
            if kind == "forbidden":
                return _text(403, "cert access denied")
            return _text(
                429,
                f"rate limited by the certificate authority; retry after {retry_after}",
                headers=[("Retry-After", retry_after)],
            )
        if domain not in self._cert_domains:
            return _text(
                500, f'invalid domain "{domain}"; must be one of {sorted(self._cert_domains)}'
            )
        kind = (params.get("type") or [""])[0]
        pem = self._cert_pems.get(domain)
        if pem is None:
            leaf = self.ca.issue_cert(domain)
            key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,  # "EC PRIVATE KEY", as tailscaled
                serialization.NoEncryption(),
            )
            pem = key_pem + b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
            self._cert_pems[domain] = pem
        key_part, _, _ = pem.partition(b"-----END EC PRIVATE KEY-----\n")
        key_part += b"-----END EC PRIVATE KEY-----\n"
        cert_part = pem[len(key_part) :]
        if kind == "pair":
            return _Answer(200, pem)
        if kind in ("", "crt", "cert"):
            return _Answer(200, cert_part)
        if kind == "key":
            return _Answer(200, key_part)
        return _text(400, "invalid type")


def _unlink_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


def _headers(answer: _Answer) -> list[tuple[str, str]]:
    """An answer's headers before its framing (``Content-Length`` or chunked)."""
    return [
        ("Content-Type", answer.content_type),
        ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        *answer.headers,
    ]


def _wire(answer: _Answer) -> bytes | None:
    """The bytes :meth:`LocalAPIStandin._send` writes for ``answer`` on a kept-alive
    connection, made by h11 on a connection of its own; None for an answer sent chunked."""
    if len(answer.body) > CHUNKING_THRESHOLD or answer.fault is not None:
        return None
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(f"GET / HTTP/1.1\r\nHost: {LOCALAPI_HOST}\r\n\r\n".encode())
    while conn.next_event() is not h11.NEED_DATA:
        pass
    headers = [*_headers(answer), ("Content-Length", str(len(answer.body)))]
    out = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
    out += conn.send(h11.Data(data=answer.body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


@contextlib.asynccontextmanager
async def run_standin(
    directory: str | os.PathLike[str], **kwargs: Any
) -> AsyncIterator[LocalAPIStandin]:
    """Run a stand-in listening on ``<directory>/tailscaled.sock`` (or on a short
    temporary path when that would be too long for a unix socket) for the block."""
    path = os.path.join(os.fspath(directory), "tailscaled.sock")
    short_dir: str | None = None
    if len(path.encode()) > _MAX_SOCKET_PATH:
        short_dir = tempfile.mkdtemp(prefix="ts-")
        path = os.path.join(short_dir, "tailscaled.sock")
    try:
        standin = LocalAPIStandin(path, **kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(standin.serve)
            try:
                yield standin
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if short_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(short_dir)


# -- standalone process ------------------------------------------------------


def _load_peers_file(standin: LocalAPIStandin, path: Path) -> None:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("the peers file must hold a JSON object")
    unknown = set(data) - {"capability", "fault", "cert_domains", "peers"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}")
    capability = data.get("capability", standin.capability)
    if not isinstance(capability, str) or not capability:
        raise ValueError("capability must be a non-empty string")
    standin.capability = capability
    standin.replace_table(
        data.get("peers") or [],
        fault=data.get("fault"),
        cert_domains=data.get("cert_domains") or [],
    )


async def _watch_peers_file(
    standin: LocalAPIStandin,
    path: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    def signature() -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(why: str) -> None:
        try:
            _load_peers_file(standin, path)
        except (OSError, ValueError) as exc:
            print(
                f"localapi-standin: {why}: cannot load {path}: {exc}; keeping the old table",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"localapi-standin: {why}: loaded {len(standin._peers)} peer(s) from {path}",
                file=sys.stderr,
                flush=True,
            )

    seen = signature()
    with trio.open_signal_receiver(signal.SIGHUP) as signals:

        async def on_signal() -> None:
            async for _ in signals:
                reload("SIGHUP")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_signal)
            # Watching (file and SIGHUP) before "ready": a change right after it is seen.
            task_status.started()
            while True:
                await trio.sleep(0.1)
                now = signature()
                if now != seen:
                    seen = now
                    reload("file changed")


async def _main_async(args: argparse.Namespace) -> None:
    standin = LocalAPIStandin(args.socket)
    if args.ca_cert_out:
        standin.ca.cert_pem.write_to_path(args.ca_cert_out)
    path = Path(args.peers) if args.peers else None
    if path is not None:
        _load_peers_file(standin, path)
    for domain in args.cert_domain:
        standin.add_cert_domain(domain)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stop_signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(standin.serve)
            if path is not None:
                await nursery.start(_watch_peers_file, standin, path)
            print(f"ready {standin.socket_path}", flush=True)
            async for _ in stop_signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A tailscaled LocalAPI stand-in on a unix socket.")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--peers", help="JSON peers file (format in this module's docstring)")
    parser.add_argument(
        "--cert-domain", action="append", default=[], help="serve certificates for this domain"
    )
    parser.add_argument("--ca-cert-out", help="write the test CA certificate (PEM) here")
    args = parser.parse_args(argv)
    try:
        trio.run(_main_async, args)
    except (OSError, ValueError) as exc:
        print(f"localapi-standin: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
