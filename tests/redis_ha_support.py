"""Throwaway highly available Redis for the state tests: a three-master Redis Cluster, and a
master with one replica watched by three Sentinels. Every server runs on a free loopback port
in a temporary directory and is killed when the topology stops. Every wait has a bound."""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import redis
import trustme

PASSWORD = "data-node-pw"
SENTINEL_PASSWORD = "sentinel-pw"
SERVICE = "wpmaster"
# How long a master must stay silent before a Sentinel thinks it is down (the configuration
# the tests give their Sentinels; docs/scaling.md explains what an operator picks).
DOWN_AFTER_MS = 1000
START_TIMEOUT = 30.0


def exe(name: str) -> str:
    """The path of a Redis program (``redis-server``, ``redis-cli``)."""
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed (dev.sh installs the redis-server package)")
    return found


def throwaway_args(workdir: Path) -> list[str]:
    """The ``redis-server`` arguments of every test server: loopback only, nothing saved,
    its files in ``workdir``."""
    return ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, bus: bool = False) -> int:
    """A free loopback port; with ``bus``, port + 10000 (the cluster bus) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not bus or (port + 10000 < 65536 and _port_free(port + 10000)):
            return port
        # An ephemeral port above 55535 has no room for its bus port: try a lower one.
        for candidate in range(20000 + port % 1000, 30000, 997):
            if _port_free(candidate) and _port_free(candidate + 10000):
                return candidate
    raise AssertionError("no free port pair for a cluster node")


def wait_until(what: str, check: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def command(c: redis.Redis, *args: str) -> Any:
    """Run a raw command (redis-py leaves execute_command unannotated)."""
    return c.execute_command(*args)  # type: ignore[no-untyped-call]


def client(port: int, password: str | None = PASSWORD) -> redis.Redis:
    return redis.Redis(
        "127.0.0.1", port, password=password, socket_timeout=2, socket_connect_timeout=2
    )


class _Servers:
    """Processes started in one temporary directory."""

    def __init__(self, label: str, *, tls: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"wp-{label}-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.tls = tls
        self.ca_file = self.dir / "ca.pem"
        self.cert_file = self.dir / "server.pem"
        self.key_file = self.dir / "server.key"
        if tls:
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1")
            ca.cert_pem.write_to_path(str(self.ca_file))
            cert.cert_chain_pems[0].write_to_path(str(self.cert_file))
            cert.private_key_pem.write_to_path(str(self.key_file))

    def client(self, port: int, password: str | None = PASSWORD) -> redis.Redis:
        """A client of the server at ``port`` (TLS, verified against the CA, when ``tls``)."""
        if not self.tls:
            return client(port, password)
        return redis.Redis(
            "127.0.0.1",
            port,
            password=password,
            socket_timeout=2,
            socket_connect_timeout=2,
            ssl=True,
            ssl_ca_certs=str(self.ca_file),
        )

    def answers(self, port: int) -> bool:
        return bool(self.client(port).ping())

    def tls_args(self, *, sentinel: bool = False) -> list[str]:
        """redis-server arguments for TLS on the port given with ``--tls-port``."""
        if not self.tls:
            return []
        args = [
            *("--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.key_file)),
            *("--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"),
            *("--tls-replication", "yes"),
        ]
        return args if sentinel else [*args, "--tls-cluster", "yes"]

    def port_args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port)] if self.tls else ["--port", str(port)]

    def spawn(self, port: int, args: list[str]) -> None:
        log = (self.dir / f"{port}.log").open("wb")
        self.procs[port] = subprocess.Popen(
            [exe("redis-server"), *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        log.close()

    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(sig)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for port in list(self.procs):
            proc = self.procs[port]
            proc.send_signal(signal.SIGCONT)  # in case a test stalled it
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _data_node_args(servers: _Servers, port: int, workdir: Path) -> list[str]:
    return [
        *servers.port_args(port),
        *servers.tls_args(),
        *throwaway_args(workdir),
        "--requirepass",
        PASSWORD,
        "--masterauth",
        PASSWORD,
        # A replica syncs at once (the default waits 5 s for more replicas to share a sync).
        "--repl-diskless-sync-delay",
        "0",
    ]


class RedisClusterServers(_Servers):
    """Three masters, no replicas, every slot assigned (``redis-cli --cluster create``)."""

    def __init__(self, *, tls: bool = False) -> None:
        super().__init__("cluster", tls=tls)
        self.ports: list[int] = []

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        for _ in range(3):
            port = free_port(bus=True)
            workdir = self.dir / str(port)
            workdir.mkdir()
            self.spawn(
                port,
                [
                    *_data_node_args(self, port, workdir),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(workdir / "nodes.conf"),
                    # generous: on a loaded 2-core machine a node can miss pings for seconds,
                    # and a node marked failing takes the (replica-less) cluster down
                    "--cluster-node-timeout",
                    "15000",
                ],
            )
            self.ports.append(port)
        for port in self.ports:
            wait_until(f"cluster node {port}", functools.partial(self.answers, port))
        subprocess.run(
            [
                exe("redis-cli"),
                *(("--tls", "--cacert", str(self.ca_file)) if self.tls else ()),
                *("-a", PASSWORD, "--no-auth-warning", "--cluster", "create"),
                *self.nodes,
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def all_ok() -> bool:
            for port in self.ports:
                info = command(self.client(port), "CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
            return True

        wait_until("cluster_state:ok on every node", all_ok)

    def node_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = int(command(self.client(self.ports[0]), "CLUSTER", "KEYSLOT", key))
        for start, end, master, *_ in command(self.client(self.ports[0]), "CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise AssertionError(f"no node serves slot {slot}")


class SentinelServers(_Servers):
    """One master, one replica, three Sentinels (quorum 2), with passwords everywhere."""

    def __init__(self, *, tls: bool = False) -> None:
        super().__init__("sentinel", tls=tls)
        self.master_port = 0
        self.replica_port = 0
        self.sentinel_ports: list[int] = []

    @property
    def sentinels(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def sentinel(self, port: int) -> redis.Redis:
        return self.client(port, SENTINEL_PASSWORD)

    def start(self, *, ready_to_fail_over: bool = True) -> None:
        """Start everything; with ``ready_to_fail_over``, also wait until the Sentinels know
        each other and the replica (a few seconds of hello messages), which a failover needs
        and a test that only uses the master does not."""
        self.master_port = free_port()
        self.replica_port = free_port()
        for port, extra in (
            (self.master_port, []),
            (self.replica_port, ["--replicaof", "127.0.0.1", str(self.master_port)]),
        ):
            workdir = self.dir / str(port)
            workdir.mkdir()
            self.spawn(port, [*_data_node_args(self, port, workdir), *extra])

        def replica_synced() -> bool:
            info: dict[str, Any] = self.client(self.replica_port).info("replication")
            return info.get("master_link_status") == "up"

        wait_until("the replica in sync", replica_synced)
        for _ in range(3):
            port = free_port()
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.dir}\n"
                f"requirepass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.spawn(
                port,
                [str(conf), "--sentinel", *self.port_args(port), *self.tls_args(sentinel=True)],
            )
            self.sentinel_ports.append(port)

        def sentinels_know_everyone() -> bool:
            for port in self.sentinel_ports:
                s = self.sentinel(port)
                if len(command(s, "SENTINEL", "SENTINELS", SERVICE)) != 2:
                    return False
                if len(command(s, "SENTINEL", "REPLICAS", SERVICE)) != 1:
                    return False
            return True

        # Sentinels find each other through hello messages (every 2 s) and the replica through
        # the master's INFO: a failover needs both.
        if ready_to_fail_over:
            wait_until(
                "three Sentinels that know each other and the replica", sentinels_know_everyone
            )
        else:
            wait_until(
                "the Sentinels to name the master", lambda: self.master_address() is not None
            )

    def rejoin(self, port: int) -> None:
        """Start the killed server at ``port`` again; the Sentinels make it a replica of the
        current master. Returns once it is in sync and every Sentinel counts it as up."""
        self.spawn(port, _data_node_args(self, port, self.dir / str(port)))

        def synced_replica() -> bool:
            info: dict[str, Any] = self.client(port).info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_until(f"{port} back as a replica in sync", synced_replica)

        def every_sentinel_sees_it_up() -> bool:
            for sport in self.sentinel_ports:
                replicas = command(self.sentinel(sport), "SENTINEL", "REPLICAS", SERVICE)
                entries = [str(r) for r in replicas if str(port) in str(r)]
                if not entries or any("s_down" in e or "disconnected" in e for e in entries):
                    return False
            return True

        wait_until(f"every Sentinel to see {port} up", every_sentinel_sees_it_up)

    def master_address(self) -> tuple[str, int] | None:
        """The master the Sentinels name now (asking them in turn)."""
        for port in self.sentinel_ports:
            try:
                found = command(self.sentinel(port), "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except (redis.RedisError, OSError):
                continue
            if found:
                host, sport = found
                host = host.decode() if isinstance(host, bytes) else str(host)
                return host, int(sport)
        return None

    def role(self, port: int) -> str:
        found = command(self.client(port), "ROLE")
        role = found[0]
        return role.decode() if isinstance(role, bytes) else str(role)
