"""End-to-end test support: a Waypoint app in-process (or as a `waypoint run` subprocess) in
front of a throwaway cluster, with the LocalAPI stand-in as tailscaled.

    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.2", {"app": {"permissions": ["readonly"]}})
        r = await env.psql("select 1", peer=..., dbname="app")

Identities: a client bound to 127.0.0.N is identity N (all of 127.0.0.0/8 is loopback).
psql/psycopg/asyncpg cannot bind a source address: they come from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pg8000.native
import trio
from localapi_standin import LocalAPIStandin, run_standin
from pgcluster import PgCluster
from state_support import KeySpace

from waypoint.app import Running, run
from waypoint.config.load import load_config_text
from waypoint.config.model import Config
from waypoint.observability.log import LOGGER_NAME

LISTENER = "pg-main"
T = TypeVar("T")
_db_counter = itertools.count(1)


def db_rule(databases: Mapping[str, Any], *, listener: str = LISTENER, **extra: Any) -> dict[str, Any]:
    """One capability rule granting ``databases`` (the ``pg.databases`` map) on ``listener``."""
    backend: dict[str, Any] = {"pg": {"databases": dict(databases)}}
    if "listener_limits" in extra:
        backend["limits"] = extra.pop("listener_limits")
    rule: dict[str, Any] = {"backends": {listener: backend}}
    rule.update(extra)
    return rule


def make_config_text(
    cluster: PgCluster,
    *,
    socket_path: str,
    listener_extra: str = "",
    postgres_extra: str = "",
    root_extra: str = "",
    tables_extra: str = "",
    tls_mode: str = "off",
    backend_tls: str = "disable",
    handshake_timeout: str = "10s",
    drain_timeout: str = "5s",
    revalidation_interval: str = "0s",
    backend: str | None = None,
    listen: str = "127.0.0.1:0",
) -> str:
    return f"""
handshake_timeout = "{handshake_timeout}"
drain_timeout = "{drain_timeout}"
{root_extra}

[identity]
provider = "tailscale"
socket = "{socket_path}"
timeout = "2s"

[revalidation]
interval = "{revalidation_interval}"

{tables_extra}

[[listeners]]
name = "{LISTENER}"
listen = "{listen}"
backend = "{backend or f"{cluster.host}:{cluster.port}"}"
tls_mode = "{tls_mode}"
backend_tls = "{backend_tls}"
{listener_extra}

[listeners.postgres]
admin_user = "{cluster.admin_user}"
admin_password = "{cluster.admin_password}"
{postgres_extra}
"""


@attrs.frozen
class StaticPeer:
    """A ``[[identity.static]]`` entry: a source address and who it is."""

    cidr: str
    login: str
    node: str
    rules: Sequence[Mapping[str, Any]]  # capability rules (``db_rule``)


def make_static_config_text(
    cluster: PgCluster, peers: Sequence[StaticPeer], *, tables_extra: str = ""
) -> str:
    """A config with static identities (no LocalAPI) and one plaintext listener on
    ``cluster``, for tests of what Waypoint itself reports (logs, metrics)."""
    identities = "".join(
        f"""
[[identity.static]]
cidr = "{p.cidr}"
login = "{p.login}"
node = "{p.node}"
grants_json = {json.dumps(json.dumps(list(p.rules)))}
"""
        for p in peers
    )
    return f"""
handshake_timeout = "10s"
drain_timeout = "2s"

[identity]
provider = "static"
{identities}
[revalidation]
interval = "0s"

{tables_extra}

[[listeners]]
name = "{LISTENER}"
listen = "127.0.0.1:0"
backend = "{cluster.host}:{cluster.port}"
tls_mode = "off"
backend_tls = "disable"

[listeners.postgres]
admin_user = "{cluster.admin_user}"
admin_password = "{cluster.admin_password}"
"""


def create_app_database(cluster: PgCluster, name: str | None = None, *, tables: Sequence[str] = ("t",)) -> str:
    """A fresh database owned by the (non-superuser) admin with tables owned by the admin."""
    name = name or f"app{os.getpid()}_{next(_db_counter)}"
    cluster.create_database(name, owner=cluster.admin_user)
    stmts = [f"SET ROLE {cluster.admin_user}"]
    for t in tables:
        stmts.append(f"CREATE TABLE public.{t} (id int primary key, v text)")
        stmts.append(f"INSERT INTO public.{t} VALUES (1, 'one')")
    cluster.execute("; ".join(stmts), dbname=name)
    return name


@attrs.define
class PsqlResult:
    returncode: int
    stdout: str
    stderr: str


@attrs.define(eq=False)
class E2EEnv:
    cluster: PgCluster
    standin: LocalAPIStandin
    running: Running
    config: Config

    @property
    def host(self) -> str:
        return self.running.address(LISTENER)[0]

    @property
    def port(self) -> int:
        return self.running.address(LISTENER)[1]

    def grant(
        self,
        ip: str,
        databases: Mapping[str, Any] | None = None,
        *,
        rules: Sequence[Any] | None = None,
        login: str | None = None,
        node: str | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        """Give the peer at ``ip`` these grants (replacing any it had)."""
        if rules is None:
            rules = [db_rule(databases or {})]
        n = ip.rsplit(".", 1)[-1]
        self.standin.set_peer(
            ip,
            login=login or f"user{n}@example.com",
            node=node or f"node{n}",
            tags=tags,
            rules=list(rules),
        )

    def dsn(self, dbname: str, *, user: str = "anyone", sslmode: str = "disable", **extra: str) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={dbname}", f"user={user}", f"sslmode={sslmode}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    async def psql(
        self,
        sql: str,
        dbname: str,
        *,
        sslmode: str = "disable",
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        binary: str | None = None,
        **extra: str,
    ) -> PsqlResult:
        """Run psql (the cluster's own, or ``binary``: /usr/bin/psql has SSL, psql 18 has not).
        ``sql`` may hold several statements; ``\\conninfo`` lines are passed as extra -c."""
        cmd = [binary or str(self.cluster.binary("psql")), self.dsn(dbname, sslmode=sslmode, **extra), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        for part in sql.split("\n"):
            if part.strip():
                cmd += ["-c", part]
        full_env = {**os.environ, **(env or {})}
        full_env.pop("PGPASSWORD", None)

        def _run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)

        r = await trio.to_thread.run_sync(_run)
        return PsqlResult(r.returncode, r.stdout, r.stderr)

    async def assert_clean(self, *, timeout: float = 10.0) -> None:
        """No live session, no slot held, no cancel key left (waits up to ``timeout``)."""
        from waypoint.state.memory import MemoryStateStore

        ctx = self.running.contexts[LISTENER]
        usage_total = keys = -1
        with trio.move_on_after(timeout):
            while True:
                usage_total = (await ctx.state.slot_usage("nobody", LISTENER)).total
                keys = len(ctx.state._cancel) if isinstance(ctx.state, MemoryStateStore) else 0
                if len(self.running.registry) == 0 and usage_total == 0 and keys == 0:
                    return
                await trio.sleep(0.05)
        raise AssertionError(
            f"not clean: sessions={len(self.running.registry)} slots={usage_total} cancel_keys={keys}"
        )

    def tls_record_layers(self) -> dict[str, int]:
        """How many relays of TLS clients this listener started, by where their record layer
        ran (``waypoint_client_tls_relays_total``): ``{"c": n}`` when every one ran in C."""
        counts: dict[str, int] = {}
        for family in self.running.metrics.registry.collect():
            if family.name != "waypoint_client_tls_relays":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["listener"] == LISTENER:
                    counts[sample.labels["record_layer"]] = int(sample.value)
        return counts

    async def pg8000_connect(self, dbname: str, *, source: str = "127.0.0.1", **kwargs: Any) -> pg8000.native.Connection:
        def _connect() -> pg8000.native.Connection:
            return pg8000.native.Connection(
                user="anyone", host=self.host, port=self.port, database=dbname,
                source_address=(source, 0), timeout=30, **kwargs,
            )

        return await trio.to_thread.run_sync(_connect)


@contextlib.asynccontextmanager
async def run_waypoint(config: Config) -> AsyncIterator[Running]:
    """``waypoint.run(config)`` in-process for the block; shut down (immediately) at the end."""
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(run, config)
        try:
            yield running
        finally:
            running.shutdown(immediate=True)


@contextlib.asynccontextmanager
async def e2e_env(
    cluster: PgCluster,
    tmp_path: Path,
    **config_kwargs: Any,
) -> AsyncIterator[E2EEnv]:
    async with run_standin(tmp_path) as standin:
        text = make_config_text(cluster, socket_path=standin.socket_path, **config_kwargs)
        config = load_config_text(text, source="e2e.toml")
        async with run_waypoint(config) as running:
            yield E2EEnv(cluster, standin, running, config)


@contextlib.asynccontextmanager
async def hostile_client_env(
    cluster: PgCluster, tmp_path: Path, certs: CertFiles, db: str, *, handshake_timeout: float
) -> AsyncIterator[E2EEnv]:
    """Waypoint in front of ``cluster`` with a short ``handshake_timeout`` and TLS optional
    (``certs``), where a normal client at 127.0.0.1 may read ``db``: for tests of hostile
    clients, which connect from other addresses or never finish their handshake."""
    async with e2e_env(
        cluster,
        tmp_path,
        handshake_timeout=f"{handshake_timeout:g}s",
        tls_mode="optional",
        listener_extra=certs.listener_extra(),
    ) as env:
        env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}})
        yield env


@contextlib.asynccontextmanager
async def two_instances(
    cluster: PgCluster, tmp_path: Path, space: KeySpace
) -> AsyncIterator[tuple[LocalAPIStandin, Config, Running, Running]]:
    """Two Waypoint instances in this process, in front of ``cluster`` and one LocalAPI
    stand-in, with one configuration whose ``[state]`` is the Redis key space ``space``."""
    async with run_standin(tmp_path) as standin:
        text = make_config_text(cluster, socket_path=standin.socket_path, tables_extra=space.toml())
        config = load_config_text(text, source="multi.toml")
        async with run_waypoint(config) as a, run_waypoint(config) as b:
            assert a.address(LISTENER) != b.address(LISTENER)
            yield standin, config, a, b


def tls_session(dsn: str, probe: Callable[[], T]) -> tuple[bool, T, int]:
    """Open a session (psycopg) to ``dsn``, run a query, ask ``probe`` (what the relay looks
    like meanwhile), then run one whose result spans many TLS records. Returns whether TLS
    was in use, the probe's answer and the length of that result (640000 when whole)."""
    import psycopg

    with psycopg.connect(dsn, connect_timeout=20) as conn:
        conn.execute("select v from t").fetchone()
        during = probe()
        row = conn.execute(
            "select length(string_agg(md5(i::text), '')) from generate_series(1, 20000) i"
        ).fetchone()
        assert row is not None
        return bool(conn.info.pgconn.ssl_in_use), during, int(row[0])


@attrs.frozen
class CertFiles:
    """A trustme server certificate written to files (for ``cert_file`` / ``key_file``)."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def listener_extra(self) -> str:
        return f'cert_file = "{self.cert_pem}"\nkey_file = "{self.key_pem}"'


def make_cert_files(directory: Path, *names: str) -> CertFiles:
    """A fresh CA and a server certificate for ``names`` (default localhost, 127.0.0.1)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(*(names or ("localhost", "127.0.0.1")))
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(files.cert_pem))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(files.cert_pem), append=True)
    cert.private_key_pem.write_to_path(str(files.key_pem))
    files.key_pem.chmod(0o600)
    return files


def peers_file(path: Path, peers: Sequence[Mapping[str, Any]]) -> Path:
    """Write a stand-in peers file atomically (for the stand-in as a process)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"peers": list(peers)}))
    tmp.replace(path)
    return path


@contextlib.contextmanager
def standin_process(tmp: Path, peers: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """The LocalAPI stand-in as a process of its own (for a Waypoint that runs as a process,
    not on the test's trio loop), serving ``peers``; yields its socket path."""
    sock = str(tmp / "ts.sock")
    path = peers_file(tmp / "peers.json", peers)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("localapi_standin.py")),
         "--socket", sock, "--peers", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        started, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if started else ""
        assert line.startswith("ready"), (line, proc.poll())
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- raw wire clients (hostile-client and fault tests) ----------------------------------------

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def raw_startup_packet(
    params: Mapping[str, str] | Sequence[tuple[str, str]], *, protocol: int = PROTOCOL_3_0
) -> bytes:
    """A StartupMessage built byte by byte (no validation: hostile tests send what they like).
    Keys and values are UTF-8; a sequence of pairs may repeat keys."""
    pairs = params.items() if isinstance(params, Mapping) else params
    body = bytearray(protocol.to_bytes(4, "big"))
    for key, value in pairs:
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return (len(body) + 4).to_bytes(4, "big") + bytes(body)


def parse_server_messages(data: bytes) -> list[tuple[str, bytes]]:
    """Split server bytes into (type, payload) messages; a trailing partial message is dropped.
    A lone ``S``/``N`` answer to an SSLRequest must be stripped by the caller first."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos + 5 <= len(data):
        kind = chr(data[pos])
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 4 or pos + 1 + length > len(data):
            break
        out.append((kind, data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def error_fields(payload: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse / NoticeResponse payload, keyed by their code letter."""
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


@attrs.frozen
class WireReply:
    """What a raw client saw: every byte the server sent and whether it closed."""

    data: bytes
    closed: bool  # the server closed (EOF or reset) before the client gave up

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        return parse_server_messages(self.data)

    @property
    def error(self) -> dict[str, str] | None:
        """The first ErrorResponse's fields, or None."""
        for kind, payload in self.messages:
            if kind == "E":
                return error_fields(payload)
        return None

    @property
    def authenticated(self) -> bool:
        return any(k == "R" and p[:4] == b"\0\0\0\0" for k, p in self.messages)


async def raw_exchange(
    host: str,
    port: int,
    chunks: Sequence[bytes],
    *,
    source: str = "127.0.0.1",
    delay: float = 0.0,
    timeout: float = 10.0,
) -> WireReply:
    """Connect from ``source``, send ``chunks`` (``delay`` seconds apart), and read until the
    server closes or ``timeout`` passes. Sending stops quietly once the server has closed."""
    stream = await trio.open_tcp_stream(host, port, local_address=source)
    received = bytearray()
    closed = False
    async with stream:

        async def sender() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for i, chunk in enumerate(chunks):
                    if i and delay:
                        await trio.sleep(delay)
                    await stream.send_all(chunk)

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        closed = True
                        break
                    received += data
                nursery.cancel_scope.cancel()
    return WireReply(bytes(received), closed)


def tls_client_hello(*, alpn: Sequence[str] = (), server_name: str | None = "localhost") -> bytes:
    """The bytes of a real TLS ClientHello (from the ssl module), to send without a handshake."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def backend_state(cluster: PgCluster, pid: int) -> tuple[str, str] | None:
    """(state, query) of backend ``pid`` in pg_stat_activity, or None if it is gone."""
    rows = cluster.execute("SELECT state, query FROM pg_stat_activity WHERE pid = :p", p=pid)
    return (str(rows[0][0]), str(rows[0][1])) if rows else None


def wait_running_blocking(cluster: PgCluster, pid: int, needle: str, timeout: float = 20.0) -> str:
    """Poll pg_stat_activity (bounded) until backend ``pid`` is active on a statement that
    contains ``needle`` ("the query has started", never a sleep); returns its role."""
    deadline = time.monotonic() + timeout
    seen: list[list[Any]] = []
    while time.monotonic() < deadline:
        seen = cluster.execute(
            "SELECT state, usename::text, query FROM pg_catalog.pg_stat_activity WHERE pid = :p",
            p=pid,
        )
        if seen and seen[0][0] == "active" and needle in str(seen[0][2]):
            return str(seen[0][1])
        time.sleep(0.05)
    raise AssertionError(f"backend {pid} never ran {needle!r}: {seen}")


async def wait_running(cluster: PgCluster, pid: int, needle: str, timeout: float = 20.0) -> str:
    """:func:`wait_running_blocking` from trio (in a worker thread)."""
    return await trio.to_thread.run_sync(
        wait_running_blocking, cluster, pid, needle, timeout, abandon_on_cancel=True
    )


def roles_with_prefix(cluster: PgCluster, prefix: str) -> set[str]:
    """Names of the cluster's roles starting with ``prefix`` (``_`` matched literally)."""
    rows = cluster.execute(
        "SELECT rolname FROM pg_catalog.pg_roles WHERE starts_with(rolname, :p)", p=prefix
    )
    return {str(r[0]) for r in rows}


class RawSession:
    """A minimal protocol-3 client over a plain socket (to see what Waypoint forwards)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.protocol = -1
        self.pid = 0
        self.secret = b""

    @classmethod
    def open(cls, env: E2EEnv, db: str, minor: int = 0, source: str = "127.0.0.1") -> RawSession:
        sock = socket.create_connection((env.host, env.port), timeout=20, source_address=(source, 0))
        self = cls(sock)
        body = struct.pack("!i", (3 << 16) | minor)
        for k, v in (("user", "raw"), ("database", db)):
            body += k.encode() + b"\0" + v.encode() + b"\0"
        body += b"\0"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        self.protocol = minor
        while True:
            kind, payload = self.read_message()
            if kind == b"v":
                self.protocol = struct.unpack("!i", payload[:4])[0] & 0xFFFF
            elif kind == b"K":
                self.pid = struct.unpack("!i", payload[:4])[0]
                self.secret = payload[4:]
            elif kind == b"E":
                raise AssertionError(f"login refused: {payload!r}")
            elif kind == b"Z":
                return self

    def read_message(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack("!i", self.buf[1:5])
                if len(self.buf) >= 1 + length:
                    kind, payload = self.buf[:1], self.buf[5 : 1 + length]
                    self.buf = self.buf[1 + length :]
                    return kind, payload
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("connection closed")
            self.buf += data

    def send_query(self, sql: str) -> None:
        body = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", len(body) + 4) + body)

    def read_result(self, *, timeout: float) -> str:
        self.sock.settimeout(timeout)
        result = ""
        while True:
            kind, payload = self.read_message()
            if kind == b"D":
                # Last column of the row, as text.
                (ncols,) = struct.unpack("!h", payload[:2])
                p = 2
                value = b""
                for _ in range(ncols):
                    (n,) = struct.unpack("!i", payload[p : p + 4])
                    value = payload[p + 4 : p + 4 + n] if n >= 0 else b""
                    p += 4 + max(n, 0)
                result = "ok:" + value.decode()
            elif kind == b"E":
                fields = dict(
                    (f[:1].decode(), f[1:].decode()) for f in payload.split(b"\0") if f
                )
                result = f"error:{fields.get('C')}:{fields.get('M')}"
            elif kind == b"Z":
                return result

    def read_result_of(self, sql: str, *, timeout: float = 10) -> str:
        self.send_query(sql)
        return self.read_result(timeout=timeout)

    def read_until_closed(self, *, timeout: float) -> dict[str, str]:
        """Without sending anything: the fields of the FATAL ErrorResponse Waypoint sends before
        it closes (AssertionError if it closes without one). A statement's ERROR before it is
        skipped: a revocation can fail the running statement (its grants are gone) before the
        session's FATAL arrives."""
        self.sock.settimeout(timeout)
        while True:
            kind, payload = self.read_message()
            if kind == b"E":
                fields = dict((f[:1].decode(), f[1:].decode()) for f in payload.split(b"\0") if f)
                if fields.get("V", fields.get("S")) != "ERROR":
                    return fields

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"X\0\0\0\4")
        self.sock.close()


# --- log capture ------------------------------------------------------------------------------


class LogRecords(logging.Handler):
    """Every record of Waypoint's log tree while installed (see :func:`capture_logs`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def event_names(self) -> list[str]:
        return [str(getattr(r, "wp_event", r.getMessage())) for r in self.records]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The fields of each line whose event is ``name``."""
        return [
            dict(getattr(r, "wp_fields", {}))
            for r in self.records
            if getattr(r, "wp_event", None) == name
        ]


@contextlib.contextmanager
def capture_logs() -> Iterator[LogRecords]:
    """Collect Waypoint's log records (all levels) for the block."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = LogRecords()
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
