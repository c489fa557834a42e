"""Relay data-path benchmark: epoll engine vs trio streams vs direct vs PgBouncer.

``python -m bench.relay_bench [--duration 5] [--rounds 3] [--clients 1,8,32]
[--systems direct,pgbouncer,engine,engine-audit,streams] [--tls]``

``engine-audit``: the engine with the statement audit on (``parameters = "hash"``, a
JSON Lines file in the run's temporary directory, the default queue bound), as ``[audit]``
makes a session; the table gives its TPS over the engine's without audit
(``audit on/off``), both from the same run.

``--tls``: clients speak TLS to the relays and to PgBouncer (``sslmode=require``, a
throwaway trustme certificate; the backend link stays plain). Both relays do the handshake
on Waypoint's own TLS stream (``waypoint.proxy.streams.ServerTLSStream``), as a session does;
the engine then decrypts in its thread (``start_relay(client_tls=stream.handover())``), the
streams relay keeps reading and writing that stream. Direct is left out (the throwaway
cluster has no TLS).

Starts a throwaway PostgreSQL (tests/pgcluster.py), then for each round and client
count runs ``pgbench -S -T <duration> -c <n> -j 2`` against every system in turn
(interleaved), and prints TPS medians and the ratio to PgBouncer (session mode) and to
direct. Each relay runs in its own process: a relay-only listener (accept, connect to the
backend, pass the startup phase through unparsed up to the first ReadyForQuery, then
hand both sockets to the relay, which therefore starts at a message boundary and tracks
real message headers, as in ``waypoint run``).

Environment switches for the relay processes (measurement only):

* ``RELAY_BENCH_PROFILE=<dir>``: run the engine thread under cProfile and write
  ``<dir>/engine-<pid>.prof`` when the process is told to stop (SIGTERM).
* ``RELAY_BENCH_AUDIT_ON_ERROR=close``: ``engine-audit`` with ``[audit] on_error = "close"``
  (default ``block``).
* ``RELAY_BENCH_SWITCHINTERVAL=<seconds>``: ``sys.setswitchinterval`` in the relay
  processes (the GIL hand-off interval between the engine thread and trio).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from waypoint.audit.session import SessionAudit, session_tracker
from waypoint.audit.sink import AuditSink, FileWriter, OnError
from waypoint.pgwire import build_error_response
from waypoint.proxy.relay import RelayEngine, open_relay_engine, relay_streams
from waypoint.proxy.relay.bridge import Reporter
from waypoint.proxy.streams import ServerTLSStream

_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


# -- the relay-only listener (child process) ----------------------------------------------


def _profile_engine(engine: RelayEngine, out_dir: str) -> None:
    """Run the engine thread's loop under cProfile; dump the stats when it returns."""
    import cProfile

    loop = engine._loop
    run = loop.run

    def profiled(reporter: Reporter) -> None:
        profiler = cProfile.Profile()
        try:
            profiler.runcall(run, reporter)
        finally:
            profiler.dump_stats(os.path.join(out_dir, f"engine-{os.getpid()}.prof"))

    loop.run = profiled  # type: ignore[method-assign]


_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_AUTH_NEEDS_REPLY = frozenset({3, 5, 10, 11})  # cleartext, MD5, SASL, SASL continue


class _Reader:
    """Exact reads from a trio stream (the startup phase only; never reads ahead)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = await self.stream.receive_some(n - len(data))
            if not chunk:
                raise EOFError("peer closed during the startup phase")
            data += chunk
        return bytes(data)

    async def message(self) -> bytes:
        header = await self.exactly(5)
        (length,) = struct.unpack_from("!i", header, 1)
        return header + await self.exactly(length - 4)


async def _pass_startup(
    client: trio.SocketStream,
    backend: trio.SocketStream,
    tls: ssl.SSLContext | None = None,
) -> trio.abc.Stream:
    """Forward the startup phase unparsed until the backend's first ReadyForQuery.

    With ``tls``, an SSLRequest is answered "S" and the client side becomes a server-side
    :class:`ServerTLSStream` (as a Waypoint session makes it), which is returned (else
    ``client``)."""
    client_stream: trio.abc.Stream = client
    c, b = _Reader(client), _Reader(backend)
    with trio.fail_after(30):
        while True:  # SSLRequest / GSSENCRequest (answered "N" by a non-TLS server), startup
            head = await c.exactly(8)
            length, code = struct.unpack("!ii", head)
            packet = head + await c.exactly(length - 8)
            if code == _SSL_REQUEST and tls is not None and client_stream is client:
                await client.send_all(b"S")
                tls_stream = ServerTLSStream(client, tls)
                await tls_stream.do_handshake()
                client_stream, c = tls_stream, _Reader(tls_stream)
                continue
            await backend.send_all(packet)
            if code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                break
            await client_stream.send_all(await b.exactly(1))
        while True:
            msg = await b.message()
            await client_stream.send_all(msg)
            kind = msg[:1]
            if kind == b"Z":
                return client_stream
            if kind == b"E":
                raise EOFError("the backend refused the login")
            if kind == b"R" and struct.unpack_from("!i", msg, 5)[0] in _AUTH_NEEDS_REPLY:
                await backend.send_all(await c.message())


def _audit_service(path: str) -> tuple[AuditSink, Callable[[int], SessionAudit]]:
    on_error: OnError = "close" if os.environ.get("RELAY_BENCH_AUDIT_ON_ERROR") == "close" else "block"
    sink = AuditSink(FileWriter(path, max_size=1 << 30, keep=1), on_error=on_error)
    sink.start()
    fatal = build_error_response("FATAL", "58030", "audit unavailable")

    def make(conn: int) -> SessionAudit:
        context = {"instance": "bench", "listener": "bench", "conn_id": f"bench-{conn}",
                   "client": "127.0.0.1", "login": "bench@example.com", "node": "bench",
                   "database": "postgres", "role": "postgres"}  # fmt: skip
        return SessionAudit(session_tracker(context, parameters="hash"), sink, fatal)

    return sink, make


async def _serve(
    mode: str,
    listen_port: int,
    backend: tuple[str, int] | str,
    cert_dir: str | None = None,
    audit_file: str | None = None,
) -> None:
    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    tls: ssl.SSLContext | None = None
    if cert_dir:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(os.path.join(cert_dir, "cert.pem"), os.path.join(cert_dir, "key.pem"))
    switch = os.environ.get("RELAY_BENCH_SWITCHINTERVAL")
    if switch:
        sys.setswitchinterval(float(switch))

    async def open_backend() -> trio.SocketStream:
        if isinstance(backend, str):
            return await trio.open_unix_socket(backend)
        return await trio.open_tcp_stream(*backend)

    make_audit: Callable[[int], SessionAudit] | None = None
    if audit_file:
        _, make_audit = _audit_service(audit_file)
    conns = itertools.count()

    async def engine_conn(engine: RelayEngine, client: trio.SocketStream) -> None:
        backend_stream = await open_backend()
        try:
            client_stream = await _pass_startup(client, backend_stream, tls)
        except (EOFError, trio.BrokenResourceError, trio.TooSlowError):
            await client.aclose()
            await backend_stream.aclose()
            return
        handover = None
        if isinstance(client_stream, ServerTLSStream):
            handover = client_stream.handover()
        c = socket.socket(fileno=client.socket.detach())
        b = socket.socket(fileno=backend_stream.socket.detach())
        for s in (c, b):
            if s.family != socket.AF_UNIX:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            audit = make_audit(next(conns)) if make_audit is not None else None
            handle = engine.start_relay(c, b, client_tls=handover, audit=audit)
            await handle.wait()
        finally:
            c.close()
            b.close()

    async def streams_conn(client: trio.SocketStream) -> None:
        async with client, await open_backend() as backend_stream:
            try:
                client_stream = await _pass_startup(client, backend_stream, tls)
            except (EOFError, trio.BrokenResourceError, trio.TooSlowError):
                return
            await relay_streams(client_stream, backend_stream)

    async def stop_on_sigterm(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                scope.cancel()
                return

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_sigterm, scope)
            if mode in ("engine", "engine-audit"):
                profile_dir = os.environ.get("RELAY_BENCH_PROFILE")
                engine_cm = open_relay_engine()
                if profile_dir:
                    # The thread starts inside open_relay_engine: wrap the loop first.
                    original_start = RelayEngine._start

                    def start(self: RelayEngine, token: trio.lowlevel.TrioToken) -> None:
                        _profile_engine(self, profile_dir)
                        original_start(self, token)

                    RelayEngine._start = start  # type: ignore[method-assign]
                async with engine_cm as engine:

                    async def handler(stream: trio.SocketStream) -> None:
                        await engine_conn(engine, stream)

                    await trio.serve_listeners(handler, listeners)
            else:
                await trio.serve_listeners(streams_conn, listeners)


# -- the harness --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _pgbouncer(
    backend_port: int,
    password: str,
    tmp: Path,
    cert_dir: Path | None = None,
    backend_socket_dir: Path | None = None,
) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("pgbouncer")
    if exe is None:
        return None
    port = _free_port()
    ini = tmp / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"postgres = host={backend_socket_dir or '127.0.0.1'} port={backend_port} "
        f"user=postgres password={password}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = session\nmax_client_conn = 200\n"
        "default_pool_size = 64\nlogfile =\npidfile =\n"
        + (
            f"client_tls_sslmode = require\nclient_tls_cert_file = {cert_dir}/cert.pem\n"
            f"client_tls_key_file = {cert_dir}/key.pem\n"
            if cert_dir is not None
            else ""
        )
    )
    os.chmod(tmp, 0o755)
    os.chmod(ini, 0o644)
    cmd = [exe, str(ini)]
    if os.geteuid() == 0:
        cmd = [exe, "-u", "postgres", str(ini)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc, port


def _pgbench(port: int, clients: int, duration: int, password: str, tls: bool = False) -> float:
    """TPS of one pgbench run. A run that ends without a result (seen on a shared machine:
    exit by a signal, no output) is retried once, loudly; a second failure raises."""
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "require" if tls else "disable"}
    for attempt in (1, 2):
        out = subprocess.run(
            ["pgbench", "-S", "-n", "-T", str(duration), "-c", str(clients), "-j", "2",
             "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
            env=env, capture_output=True, text=True, timeout=duration + 60, check=False,
        )  # fmt: skip
        m = _TPS.search(out.stdout)
        if m is not None:
            return float(m.group(1))
        detail = (
            f"pgbench on port {port} with {clients} clients gave no result "
            f"(exit status {out.returncode}): stderr {out.stderr.strip()[-400:]!r} "
            f"stdout {out.stdout.strip()[-400:]!r}"
        )
        if attempt == 2:
            raise RuntimeError(detail)
        print(f"warning: {detail}; retrying once", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument(
        "--systems",
        default="direct,pgbouncer,engine,streams",
        help="comma-separated subset of direct,pgbouncer,engine,engine-audit,streams",
    )
    parser.add_argument("--tls", action="store_true", help="clients speak TLS to the relays")
    parser.add_argument(
        "--backend-unix",
        action="store_true",
        help="the relays and PgBouncer reach PostgreSQL over its unix socket (clients: TCP)",
    )
    parser.add_argument(
        "--serve", choices=["engine", "engine-audit", "streams"], help=argparse.SUPPRESS
    )
    parser.add_argument("--audit-file", help=argparse.SUPPRESS)
    parser.add_argument("--cert-dir", help=argparse.SUPPRESS)
    parser.add_argument("--listen-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend-path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        backend: tuple[str, int] | str = args.backend_path or ("127.0.0.1", args.backend_port)
        trio.run(_serve, args.serve, args.listen_port, backend, args.cert_dir, args.audit_file)
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from pgcluster import PgCluster  # type: ignore[import-not-found]

    clients = [int(c) for c in args.clients.split(",")]
    wanted = set(args.systems.split(","))
    unknown = wanted - {"direct", "pgbouncer", "engine", "engine-audit", "streams"}
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    cluster = PgCluster.start(max_connections=200)
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="wp-relay-bench-"))
    try:
        password = cluster.superuser_password
        subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(cluster.port),
             "-U", "postgres", "postgres"],
            env={**os.environ, "PGPASSWORD": password}, check=True, capture_output=True,
            timeout=120,
        )  # fmt: skip
        cert_dir: Path | None = None
        if args.tls:
            import trustme

            cert_dir = tmp / "tls"
            cert_dir.mkdir()
            cert = trustme.CA().issue_cert("127.0.0.1")
            cert.cert_chain_pems[0].write_to_path(str(cert_dir / "cert.pem"))
            cert.private_key_pem.write_to_path(str(cert_dir / "key.pem"))
            os.chmod(cert_dir, 0o755)
            for name in ("cert.pem", "key.pem"):
                os.chmod(cert_dir / name, 0o644)  # PgBouncer runs as postgres
        systems: dict[str, int] = {}
        if "direct" in wanted and not args.tls:
            systems["direct"] = cluster.port
        bouncer = (
            _pgbouncer(
                cluster.port,
                password,
                tmp,
                cert_dir,
                cluster.socket_dir if args.backend_unix else None,
            )
            if "pgbouncer" in wanted
            else None
        )
        if bouncer is not None:
            procs.append(bouncer[0])
            systems["pgbouncer"] = bouncer[1]
        for mode in ("engine", "engine-audit", "streams"):
            if mode not in wanted:
                continue
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.relay_bench",
                        "--serve",
                        mode,
                        "--listen-port",
                        str(port),
                        "--backend-port",
                        str(cluster.port),
                        *(["--cert-dir", str(cert_dir)] if cert_dir is not None else []),
                        *(["--backend-path", cluster.socket_path()] if args.backend_unix else []),
                        *(
                            ["--audit-file", str(tmp / "audit.jsonl")]
                            if mode == "engine-audit"
                            else []
                        ),
                    ],
                )
            )
            _wait_port(port)
            systems[mode] = port
        results: dict[tuple[str, int], list[float]] = {}
        for rnd in range(args.rounds):
            for n in clients:
                for name, port in systems.items():
                    tps = _pgbench(
                        port, n, args.duration, password, tls=name != "direct" and args.tls
                    )
                    results.setdefault((name, n), []).append(tps)
                    print(f"round {rnd + 1} clients {n:>2} {name:<9} {tps:>10.0f} tps", flush=True)
        print(
            "\nclients | "
            + " | ".join(systems)
            + " | engine/pgbouncer | engine/direct | audit on/off"
        )
        for n in clients:
            med = {name: statistics.median(results[(name, n)]) for name in systems}
            cells = " | ".join(f"{med[name]:,.0f}" for name in systems)
            engine = med.get("engine")
            bouncer_tps = med.get("pgbouncer")
            direct_tps = med.get("direct")
            vs_bouncer = f"{engine / bouncer_tps:.2f}x" if engine and bouncer_tps else "n/a"
            vs_direct = f"{engine / direct_tps:.2f}x" if engine and direct_tps else "n/a"
            audited = med.get("engine-audit")
            on_off = f"{audited / engine:.2f}x" if audited and engine else "n/a"
            print(f"{n} | {cells} | {vs_bouncer} | {vs_direct} | {on_off}")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
