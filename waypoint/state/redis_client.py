"""The Redis client of the shared state: where Redis is and how it is reached.

One server (``url``), a Sentinel-managed master (``sentinels``), or a Redis Cluster
(``cluster = true``), each through redis-py's own sync client, optionally over TLS with a
verified certificate. None of them retries a command: a script whose answer was lost may
have run, and running it again would count twice (the store marks the keys for repair
instead). ``on_connect`` runs after every new connection to a server, so the store can
re-assert what it holds on a server that may have lost the last acknowledged writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import redis
import redis.cluster
import redis.sentinel
import trio
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from waypoint.config.model import StateConfig, split_host_port

# What "Redis is unavailable" looks like from here. RedisClusterException (no cluster node
# answers, or the slot table is incomplete) is not a RedisError.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.RedisError,
    RedisClusterException,
    OSError,
    trio.TooSlowError,
)


class RedisClient(Protocol):
    """The commands the store sends: what ``redis.Redis`` (one server or a Sentinel-managed
    master) and ``redis.cluster.RedisCluster`` have in common."""

    def set(self, name: str, value: str, *, px: int | None = None, nx: bool = False) -> Any: ...

    def delete(self, *names: str) -> Any: ...

    def getrange(self, key: str, start: int, end: int) -> Any: ...

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: str | int) -> Any: ...

    def script_load(self, script: bytes) -> Any: ...

    def ping(self) -> Any: ...

    # The console's records (waypoint.state.console).
    def pipeline(self, transaction: bool = True) -> Any: ...

    def zadd(self, name: str, mapping: dict[str, int]) -> Any: ...

    def zrem(self, name: str, *values: str) -> Any: ...

    def zremrangebyscore(self, name: str, min: int | str, max: int | str) -> Any: ...

    def zrangebyscore(self, name: str, min: int | str, max: int | str) -> Any: ...

    def mget(self, keys: list[str]) -> Any: ...

    def hset(self, name: str, key: str, value: str) -> Any: ...

    def hdel(self, name: str, *keys: str) -> Any: ...

    def hgetall(self, name: str) -> Any: ...

    def hmget(self, name: str, keys: list[str]) -> Any: ...

    def close(self) -> None: ...


ConnectHook = Callable[[], None]


class LazyClusterClient:
    """A ``RedisCluster`` made at its first use, in a worker thread.

    redis-py's cluster client reads the slot table from a seed node when it is created, so
    making it where the store is opened would block the event loop and fail the start when
    the cluster is down; here a call made while no seed answers fails like any unavailable
    Redis (the store refuses connections) and the next call tries again."""

    def __init__(self, make: Callable[[], redis.cluster.RedisCluster]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._client: redis.cluster.RedisCluster | None = None
        self._closed = False

    def _get(self) -> redis.cluster.RedisCluster:
        with self._lock:
            if self._closed:
                raise redis.ConnectionError("the Redis Cluster client is closed")
            if self._client is None:
                self._client = self._make()
            return self._client

    def set(self, name: str, value: str, *, px: int | None = None, nx: bool = False) -> Any:
        return self._get().set(name, value, px=px, nx=nx)

    def delete(self, *names: str) -> Any:
        return self._get().delete(*names)

    def getrange(self, key: str, start: int, end: int) -> Any:
        return self._get().getrange(key, start, end)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: str | int) -> Any:
        return self._get().evalsha(sha, numkeys, *keys_and_args)

    def script_load(self, script: bytes) -> Any:
        return self._get().script_load(script)  # to every primary

    def ping(self) -> Any:
        return self._get().ping()

    def pipeline(self, transaction: bool = True) -> Any:
        return self._get().pipeline(transaction=transaction)  # type: ignore[no-untyped-call]

    def zadd(self, name: str, mapping: dict[str, int]) -> Any:
        return self._get().zadd(name, mapping)

    def zrem(self, name: str, *values: str) -> Any:
        return self._get().zrem(name, *values)

    def zremrangebyscore(self, name: str, min: int | str, max: int | str) -> Any:
        return self._get().zremrangebyscore(name, min, max)

    def zrangebyscore(self, name: str, min: int | str, max: int | str) -> Any:
        return self._get().zrangebyscore(name, min, max)

    def mget(self, keys: list[str]) -> Any:
        return self._get().mget(keys)

    def hset(self, name: str, key: str, value: str) -> Any:
        return self._get().hset(name, key, value)

    def hdel(self, name: str, *keys: str) -> Any:
        return self._get().hdel(name, *keys)

    def hgetall(self, name: str) -> Any:
        return self._get().hgetall(name)

    def hmget(self, name: str, keys: list[str]) -> Any:
        return self._get().hmget(name, keys)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def make_client(
    cfg: StateConfig, *, max_connections: int, op_timeout: float, on_connect: ConnectHook
) -> RedisClient:
    """The redis-py client for ``cfg`` (one server, Sentinel or Cluster). ``on_connect``
    runs in the connecting thread after every new connection to a Redis server."""
    timeouts: dict[str, Any] = {
        "socket_timeout": op_timeout,
        "socket_connect_timeout": min(1.0, op_timeout),
    }
    mode = cfg.redis_mode
    if mode == "url":
        return _url_client(cfg, max_connections, op_timeout, timeouts, on_connect)
    if mode == "sentinel":
        return _sentinel_client(cfg, max_connections, timeouts, on_connect)
    return _cluster_client(cfg, max_connections, timeouts, on_connect)


def _plain_hook(on_connect: ConnectHook) -> Callable[[Any], None]:
    """A ``redis_connect_func`` for ``redis.Redis``: it replaces the handshake, so it runs
    the handshake first."""

    def hook(conn: Any) -> None:
        conn.on_connect()
        on_connect()

    return hook


def _auth(cfg: StateConfig) -> dict[str, Any]:
    """The credentials and TLS settings of a Sentinel-managed master or a cluster node."""
    return {"username": cfg.username, "password": cfg.password, **_tls(cfg)}


def _tls(cfg: StateConfig) -> dict[str, Any]:
    if not cfg.tls:
        return {}
    return {
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": cfg.tls_ca_file,
    }


def _url_client(
    cfg: StateConfig,
    max_connections: int,
    op_timeout: float,
    timeouts: dict[str, Any],
    on_connect: ConnectHook,
) -> RedisClient:
    if not cfg.url:
        raise ValueError('[state] backend = "redis" needs [state] url')
    pool = redis.BlockingConnectionPool.from_url(
        cfg.url,
        max_connections=max_connections,
        timeout=op_timeout,
        retry=_no_retry(),
        redis_connect_func=_plain_hook(on_connect),
        **timeouts,
    )
    return redis.Redis(connection_pool=pool, retry=_no_retry())


def _sentinel_client(
    cfg: StateConfig, max_connections: int, timeouts: dict[str, Any], on_connect: ConnectHook
) -> RedisClient:
    if not cfg.service_name:
        raise ValueError("[state] sentinels needs [state] service_name")
    sentinel = redis.sentinel.Sentinel(
        [split_host_port(a) for a in cfg.sentinels],
        sentinel_kwargs={"password": cfg.sentinel_password, **_tls(cfg), **timeouts},
        **timeouts,
    )
    # SentinelConnectionPool does not block for a free connection; the store's capacity
    # limiter already keeps the calls (and so the connections) to max_connections.
    client: redis.Redis = sentinel.master_for(
        cfg.service_name,
        max_connections=max_connections,
        retry=_no_retry(),
        redis_connect_func=_plain_hook(on_connect),
        **_auth(cfg),
        **timeouts,
    )
    return client


def _cluster_client(
    cfg: StateConfig, max_connections: int, timeouts: dict[str, Any], on_connect: ConnectHook
) -> RedisClient:
    if not cfg.nodes:
        raise ValueError("[state] cluster = true needs [state] nodes")
    # (redis-py leaves ClusterNode's constructor unannotated.)
    seeds = [
        redis.cluster.ClusterNode(*split_host_port(a))  # type: ignore[no-untyped-call]
        for a in cfg.nodes
    ]

    def hook(_conn: Any) -> None:  # RedisCluster runs it after its handshake
        on_connect()

    def make() -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(
            startup_nodes=seeds,
            retry=_no_retry(),
            max_connections=max_connections,
            redis_connect_func=hook,
            **_auth(cfg),
            **timeouts,
        )

    return LazyClusterClient(make)
