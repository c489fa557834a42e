"""The benchmark's throwaway world: one PostgreSQL cluster, the LocalAPI stand-in as a
process, Waypoint as a ``waypoint run`` subprocess and PgBouncer (session mode).

Everything is started by :func:`open_bench_env` and torn down when its block ends, also on
errors and Ctrl-C. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from waypoint.demo.pgrun import free_port

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from pgcluster import PgCluster  # type: ignore[import-not-found]  # noqa: E402

LISTENER = "pg-main"  # pool = false: the unpooled figures (relay, connect, burst, bulk)
POOLED_LISTENER = "pg-pooled"  # the pool's defaults: the pooled connect figures
BENCH_DB = "benchdb"
SCRAM_USER = "bench_scram"
PGBENCH_IDENTITY = "127.0.0.1"
_PORT_WAIT = 30.0
_STOP_WAIT = 15.0


class BenchSetupError(RuntimeError):
    """Something the benchmark needs could not be set up (the message says what)."""


def wait_port(port: int, proc: subprocess.Popen[Any] | None, what: str, timeout: float = _PORT_WAIT) -> None:
    """Wait until something accepts on 127.0.0.1:port; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchSetupError(f"{what} exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchSetupError(f"{what}: nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = _STOP_WAIT) -> None:
    """SIGTERM, wait (bounded), then SIGKILL. Only ever this one process."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def grant_rule(database: str) -> dict[str, Any]:
    entry = {"pg": {"databases": {database: {"permissions": ["readonly"]}}}}
    return {"backends": {LISTENER: entry, POOLED_LISTENER: entry}}


def peer(ip: str, database: str) -> dict[str, Any]:
    n = ip.rsplit(".", 1)[-1]
    return {
        "ip": ip,
        "login": f"bench{n}@example.com",
        "node": f"bench-node{n}",
        "tags": [],
        "rules": [grant_rule(database)],
    }


def identity_ips(first: int, count: int) -> list[str]:
    """``count`` loopback addresses 127.0.0.<first>, 127.0.0.<first + 1>, ..."""
    if not (first >= 1 and first + count - 1 <= 254):
        raise ValueError(f"identities 127.0.0.{first}..+{count} do not fit in 127.0.0.1..254")
    return [f"127.0.0.{i}" for i in range(first, first + count)]


@attrs.frozen
class Tls:
    cert_file: Path
    key_file: Path
    ca_file: Path


def _make_tls(tmp: Path) -> Tls:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = Tls(tmp / "wp-cert.pem", tmp / "wp-key.pem", tmp / "wp-ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(paths.cert_file))
    cert.private_key_pem.write_to_path(str(paths.key_file))
    ca.cert_pem.write_to_path(str(paths.ca_file))
    os.chmod(paths.key_file, 0o600)
    return paths


def waypoint_config_text(
    cluster: Any, *, socket_path: str, port: int, pooled_port: int, tls: Tls, max_conns_total: int
) -> str:
    return f"""
handshake_timeout = "30s"
drain_timeout = "2s"

[identity]
provider = "tailscale"
socket = "{socket_path}"
timeout = "5s"

[revalidation]
interval = "0s"

[defaults.limits]
max_conns_total = {max_conns_total}

[[listeners]]
name = "{LISTENER}"
listen = "127.0.0.1:{port}"
backend = "{cluster.host}:{cluster.port}"
tls_mode = "optional"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
backend_tls = "disable"
pool = false

[listeners.postgres]
admin_user = "{cluster.admin_user}"
admin_password = "{cluster.admin_password}"

[[listeners]]
name = "{POOLED_LISTENER}"
listen = "127.0.0.1:{pooled_port}"
backend = "{cluster.host}:{cluster.port}"
tls_mode = "off"
backend_tls = "disable"

[listeners.postgres]
admin_user = "{cluster.admin_user}"
admin_password = "{cluster.admin_password}"
"""


@attrs.define(eq=False)
class BenchEnv:
    """The running world. Ports are on 127.0.0.1."""

    cluster: Any  # PgCluster
    tmp: Path
    scram_password: str
    waypoint: subprocess.Popen[bytes]
    waypoint_port: int
    #: The listener with the pool on (its defaults); ``waypoint_port``'s has ``pool = false``.
    waypoint_pooled_port: int
    waypoint_log: Path
    waypoint_command: list[str]
    tls: Tls
    pgbouncer_port: int | None
    pgbouncer_note: str
    pgbouncer_version: str | None
    pgbouncer_pid: int | None
    peers_file: Path
    peers: dict[str, dict[str, Any]]
    #: A second PgBouncer with client TLS (client_tls_sslmode = require, Waypoint's certificate).
    pgbouncer_tls_port: int | None = None
    pgbouncer_tls_pid: int | None = None

    @property
    def direct_port(self) -> int:
        port: int = self.cluster.port
        return port

    def binary(self, name: str) -> str:
        return str(self.cluster.binary(name))

    def add_identities(self, ips: Sequence[str], database: str = BENCH_DB) -> None:
        """Give these peers a readonly grant on ``database``; waits until the stand-in has
        re-read its peers file (it polls the file every 0.1 s)."""
        for ip in ips:
            self.peers[ip] = peer(ip, database)
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"peers": list(self.peers.values())}))
        tmp.replace(self.peers_file)
        time.sleep(0.5)

    def waypoint_rss_kib(self) -> int:
        return rss_kib(self.waypoint.pid)

    def waypoint_cpu_seconds(self) -> float:
        return cpu_seconds(self.waypoint.pid)

    def proxy_cpu_seconds(self, target: str) -> float | None:
        """CPU seconds used so far by the proxy process behind ``target`` (None: direct)."""
        if target.startswith("waypoint"):
            return cpu_seconds(self.waypoint.pid)
        if target == "pgbouncer" and self.pgbouncer_pid is not None:
            return cpu_seconds(self.pgbouncer_pid)
        if target == "pgbouncer_tls" and self.pgbouncer_tls_pid is not None:
            return cpu_seconds(self.pgbouncer_tls_pid)
        return None

    def check_alive(self) -> None:
        if self.waypoint.poll() is not None:
            tail = self.waypoint_log.read_text(errors="replace")[-3000:]
            raise BenchSetupError(f"waypoint exited with status {self.waypoint.returncode}:\n{tail}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchSetupError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process (from /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _run_checked(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(
        list(cmd), env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchSetupError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def ensure_pgbouncer(log: Callable[[str], None], *, install_timeout: float = 300) -> tuple[str | None, str]:
    """The pgbouncer executable (installing the Debian package as root if missing), or None
    and a note saying why not."""
    exe = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if exe is not None:
        return exe, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "pgbouncer is not installed and this is not root with apt-get: PgBouncer rows skipped"
    log("installing pgbouncer (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "pgbouncer"]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=install_timeout, check=False, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                return None, f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}; PgBouncer rows skipped"
    except subprocess.TimeoutExpired:
        return None, f"installing pgbouncer took over {install_timeout:g} s: PgBouncer rows skipped"
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(exe, os.X_OK):
        return None, "apt-get installed pgbouncer but no executable was found: PgBouncer rows skipped"
    return exe, "pgbouncer was installed by the harness (apt-get)"


def _start_pgbouncer(
    exe: str, cluster: Any, password: str, tmp: Path, stack: contextlib.ExitStack, tls: Tls | None = None
) -> tuple[int, str, int]:
    """One PgBouncer in session mode; with ``tls``, clients must speak TLS to it
    (``client_tls_sslmode = require``) with that certificate (Waypoint's)."""
    port = free_port()
    bdir = tmp / ("pgbouncer-tls" if tls else "pgbouncer")
    bdir.mkdir(mode=0o755)
    ini = bdir / "pgbouncer.ini"
    tls_lines = ""
    own = [ini]
    if tls is not None:
        # Copies PgBouncer (running as postgres) may read.
        cert, key = bdir / "cert.pem", bdir / "key.pem"
        shutil.copyfile(tls.cert_file, cert)
        shutil.copyfile(tls.key_file, key)
        os.chmod(key, 0o600)
        own += [cert, key]
        tls_lines = f"client_tls_sslmode = require\nclient_tls_cert_file = {cert}\nclient_tls_key_file = {key}\n"
    ini.write_text(
        "[databases]\n"
        f"{BENCH_DB} = host=127.0.0.1 port={cluster.port} dbname={BENCH_DB} "
        f"user={SCRAM_USER} password={password}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = session\nmax_client_conn = 2000\n"
        "default_pool_size = 100\nlogfile =\npidfile =\n" + tls_lines
    )
    os.chmod(ini, 0o600)
    cmd = [exe, str(ini)]
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        for path in (*own, bdir):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        cmd = [exe, "-u", "postgres", str(ini)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(bdir / "stderr").open("wb"), stdin=subprocess.DEVNULL)
    stack.callback(stop_process, proc)
    wait_port(port, proc, "pgbouncer")
    version = _run_checked([exe, "--version"]).splitlines()[0].strip()
    return port, version, proc.pid


@contextlib.contextmanager
def open_bench_env(
    *,
    scale: int,
    max_connections: int,
    max_conns_total: int,
    with_pgbouncer: bool,
    waypoint_prefix: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> Iterator[BenchEnv]:
    """Start everything; yield the env; stop everything (also on errors)."""
    raise_fd_limit()
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="wp-bench-"))
        os.chmod(tmp, 0o755)
        stack.callback(shutil.rmtree, tmp, True)

        log(f"starting PostgreSQL (max_connections={max_connections})")
        cluster = PgCluster.start(
            "system",
            max_connections=max_connections,
            settings={"shared_buffers": "256MB"},
        )
        stack.callback(cluster.stop)
        scram_password = secrets.token_urlsafe(18)
        cluster.add_user(SCRAM_USER, scram_password, "scram-sha-256")
        cluster.create_database(BENCH_DB, owner=cluster.admin_user)
        log(f"pgbench -i -s {scale} (tables owned by {cluster.admin_user})")
        _run_checked(
            [str(cluster.binary("pgbench")), "-i", "-q", "-s", str(scale), "-h", cluster.host,
             "-p", str(cluster.port), "-U", cluster.admin_user, BENCH_DB],
            env={"PGPASSWORD": cluster.admin_password},
        )  # fmt: skip
        cluster.execute(
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {SCRAM_USER}", dbname=BENCH_DB,
            user=cluster.admin_user,
        )
        cluster.execute("VACUUM ANALYZE", dbname=BENCH_DB)

        # The LocalAPI stand-in, as a process.
        peers_file = tmp / "peers.json"
        peers: dict[str, dict[str, Any]] = {PGBENCH_IDENTITY: peer(PGBENCH_IDENTITY, BENCH_DB)}
        peers_file.write_text(json.dumps({"peers": list(peers.values())}))
        sock_dir = tmp / "ts"
        sock_dir.mkdir()
        socket_path = sock_dir / "tailscaled.sock"
        standin = subprocess.Popen(
            [sys.executable, str(TESTS / "localapi_standin.py"), "--socket", str(socket_path),
             "--peers", str(peers_file)],
            stdout=subprocess.PIPE, stderr=(tmp / "standin.stderr").open("wb"), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        stack.callback(stop_process, standin)
        _wait_ready_line(standin, "localapi stand-in")

        # Waypoint, as a subprocess.
        tls = _make_tls(tmp)
        port, pooled_port = free_port(), free_port()
        config = tmp / "waypoint.toml"
        config.write_text(
            waypoint_config_text(
                cluster, socket_path=str(socket_path), port=port, pooled_port=pooled_port,
                tls=tls, max_conns_total=max_conns_total,
            )
        )  # fmt: skip
        os.chmod(config, 0o600)
        wp_exe = Path(sys.executable).with_name("waypoint")
        wp_cmd = [*waypoint_prefix, str(wp_exe), "run", "-c", str(config)]
        wp_log = tmp / "waypoint.log"
        log(f"starting waypoint: {' '.join(wp_cmd)}")
        waypoint = subprocess.Popen(
            wp_cmd, stdout=wp_log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        stack.callback(stop_process, waypoint)
        try:
            wait_port(port, waypoint, "waypoint")
            wait_port(pooled_port, waypoint, "waypoint (pooled listener)")
        except BenchSetupError as exc:
            raise BenchSetupError(f"{exc}\n{wp_log.read_text(errors='replace')[-3000:]}") from None

        bouncer_port: int | None = None
        bouncer_version: str | None = None
        bouncer_pid: int | None = None
        bouncer_tls_port: int | None = None
        bouncer_tls_pid: int | None = None
        note = "PgBouncer not requested"
        if with_pgbouncer:
            exe, note = ensure_pgbouncer(log)
            if exe is not None:
                bouncer_port, bouncer_version, bouncer_pid = _start_pgbouncer(exe, cluster, scram_password, tmp, stack)
                bouncer_tls_port, _, bouncer_tls_pid = _start_pgbouncer(exe, cluster, scram_password, tmp, stack, tls)

        yield BenchEnv(
            cluster=cluster, tmp=tmp, scram_password=scram_password, waypoint=waypoint,
            waypoint_port=port, waypoint_pooled_port=pooled_port, waypoint_log=wp_log, waypoint_command=wp_cmd, tls=tls,
            pgbouncer_port=bouncer_port, pgbouncer_note=note, pgbouncer_version=bouncer_version,
            pgbouncer_pid=bouncer_pid,
            peers_file=peers_file, peers=peers,
            pgbouncer_tls_port=bouncer_tls_port, pgbouncer_tls_pid=bouncer_tls_pid,
        )  # fmt: skip


#: The statement audit of the audited Waypoint (the audit rows): as an operator would turn
#: it on, parameters hashed; rotated so that a long run stays within ~200 MB of disk.
AUDIT_CONFIG = """
[audit]
enabled = true
sink = "file"
file = "{file}"
max_size = "64MB"
keep = 2
parameters = "hash"
"""


@contextlib.contextmanager
def audited_waypoint(env: BenchEnv, log: Callable[[str], None] = print) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    """A second ``waypoint run``, the same configuration as ``env``'s on its own port, with
    ``[audit]`` on (:data:`AUDIT_CONFIG`): yields its port, process and audit file; stopped
    when the block ends."""
    audit_file = env.tmp / "audit.jsonl"
    text = (env.tmp / "waypoint.toml").read_text()
    # Every listener on a port of its own (the first one is measured).
    ports: list[int] = []

    def own_port(_: re.Match[str]) -> str:
        ports.append(free_port())
        return f'listen = "127.0.0.1:{ports[-1]}"'

    text = re.sub(r'(?m)^listen = "127\.0\.0\.1:\d+"$', own_port, text)
    port = ports[0]
    config = env.tmp / "waypoint-audit.toml"
    config.write_text(text + AUDIT_CONFIG.format(file=audit_file))
    os.chmod(config, 0o600)
    cmd = [str(Path(sys.executable).with_name("waypoint")), "run", "-c", str(config)]
    wp_log = env.tmp / "waypoint-audit.log"
    log(f"starting the audited waypoint: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=wp_log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        try:
            wait_port(port, proc, "audited waypoint")
        except BenchSetupError as exc:
            raise BenchSetupError(f"{exc}\n{wp_log.read_text(errors='replace')[-3000:]}") from None
        yield port, proc, audit_file
        if proc.poll() is not None:
            raise BenchSetupError(f"the audited waypoint exited ({proc.returncode}):\n{wp_log.read_text(errors='replace')[-3000:]}")
    finally:
        stop_process(proc)


def _wait_ready_line(proc: subprocess.Popen[bytes], what: str, timeout: float = _PORT_WAIT) -> None:
    assert proc.stdout is not None
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise BenchSetupError(f"{what} exited with status {proc.wait(5)} before it was ready")
            buf += chunk
            if re.search(rb"^ready ", buf, re.M):
                return
    finally:
        sel.close()
    raise BenchSetupError(f"{what} printed no ready line within {timeout:g} s")
