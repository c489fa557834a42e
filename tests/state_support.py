"""Helpers for the state tests: a test's own key space on a Redis, unique key prefixes, a
private redis-server (the session's shared one, or one a test may stop and stall)."""

from __future__ import annotations

import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis_ha_support import exe, throwaway_args, wait_until

from waypoint.config.model import StateConfig
from waypoint.state import CancelTarget


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def cancel_target(
    host: str, port: int, listener: str = "pg-main", principal: str = "alice@example.com"
) -> CancelTarget:
    """A cancel target for the state tests (the backend address is what they vary)."""
    return CancelTarget(listener, (host, port), principal)


def unique_prefix() -> str:
    return f"wptest:{uuid.uuid4().hex[:12]}:"


def delete_prefix(prefix: str, url: str) -> None:
    client = redis_client(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


@dataclass(frozen=True)
class KeySpace:
    """One test's keys on a Redis: the server's URL and a key prefix no other test uses."""

    url: str
    prefix: str = field(default_factory=unique_prefix)

    def config(self, **fields: Any) -> StateConfig:
        """A Redis ``[state]`` configuration for this key space."""
        return StateConfig(backend="redis", url=self.url, key_prefix=self.prefix, **fields)

    def toml(self) -> str:
        """The same as a ``[state]`` table of a configuration file."""
        return f'[state]\nbackend = "redis"\nurl = "{self.url}"\nkey_prefix = "{self.prefix}"\n'

    def client(self) -> redis.Redis:
        return redis_client(self.url)

    def keys(self, pattern: str = "*") -> list[bytes]:
        """This space's keys matching ``pattern`` (after the prefix)."""
        client = self.client()
        try:
            return list(client.scan_iter(match=self.prefix + pattern, count=500))
        finally:
            client.close()

    def delete(self) -> None:
        delete_prefix(self.prefix, self.url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A private redis-server on a free port, in ``workdir``, that a test may kill, stall and
    restart (empty: nothing is saved)."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.exe = exe("redis-server")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = password
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{self.password}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        auth = [] if self.password is None else ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), *throwaway_args(self.workdir), *auth],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        try:
            wait_until("own redis-server", lambda: bool(redis_client(self.url).ping()), 10)
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
