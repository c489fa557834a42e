"""Helpers for the state tests: the machine's Redis, unique key prefixes, own redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import redis

from waypoint.state import CancelTarget

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_client(url: str = REDIS_URL) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def require_redis(url: str = REDIS_URL) -> None:
    """Fail (never skip) when the Redis the suite needs is not there."""
    try:
        redis_client(url).ping()
    except (redis.RedisError, OSError) as exc:
        raise AssertionError(
            f"Redis at {url} is not reachable ({exc}); start one (.ci/run does) — "
            "the Redis state tests fail rather than skip"
        ) from exc


def cancel_target(
    host: str, port: int, listener: str = "pg-main", principal: str = "alice@example.com"
) -> CancelTarget:
    """A cancel target for the state tests (the backend address is what they vary)."""
    return CancelTarget(listener, (host, port), principal)


def unique_prefix() -> str:
    return f"wptest:{uuid.uuid4().hex[:12]}:"


def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    client = redis_client(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A private redis-server on a free port that a test may kill, stall and restart."""

    def __init__(self, *, password: str | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise AssertionError("redis-server is not installed (dev.sh installs it)")
        self.exe = exe
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = password

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{self.password}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *([] if self.password is None else ["--requirepass", self.password]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_client(self.url).ping()
                return
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("own redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
