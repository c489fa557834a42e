"""A listener's context: the app's wiring for the connection tasks of one listener (its
configuration, provisioner, TLS, shared state, relay engine, and where its sessions' backends
come from). The app makes one per listener and a new one at each reload; a connection keeps the
context it was accepted with to its end (``proxy.listener.CurrentContext``)."""

from __future__ import annotations

import ssl

import attrs
import trio

from waypoint.audit.service import AuditService
from waypoint.config.model import Config, ListenerConfig
from waypoint.console.hub import ConsoleHub
from waypoint.identity.model import IdentityProvider
from waypoint.observability.metrics import Metrics
from waypoint.pool import BackendPool
from waypoint.provision.engine import Provisioner
from waypoint.proxy.admission import Admission
from waypoint.proxy.registry import RefusalCache, SessionRegistry
from waypoint.proxy.relay import RelayEngine
from waypoint.proxy.source import BackendSource, ConnectingSource
from waypoint.proxy.tls import ClientTLS
from waypoint.state.base import StateStore


@attrs.define(eq=False)
class ListenerContext:
    """Everything a connection task of one listener needs, owned by the app's nursery."""

    config: Config
    listener: ListenerConfig
    identity: IdentityProvider
    provisioner: Provisioner
    state: StateStore
    engine: RelayEngine | None
    tls: ClientTLS
    backend_ssl: ssl.SSLContext | None
    registry: SessionRegistry
    refusals: RefusalCache
    metrics: Metrics
    pbkdf2_limiter: trio.CapacityLimiter
    accepting: bool = True
    #: The app's pre-authentication bounds (handshakes per address, cancel rate).
    admission: Admission = attrs.field(kw_only=True)
    #: The console (its database, SHOW SESSIONS, KILL, LOCK); None: no console database.
    console: ConsoleHub | None = attrs.field(default=None, kw_only=True)
    #: The statement audit (None: ``[audit]`` is off, and no relay carries a hook).
    audit: AuditService | None = attrs.field(default=None, kw_only=True)
    #: The app's pool of idle backends (every listener's; None: no pooling anywhere). A
    #: listener with ``pool = false`` neither keeps nor takes.
    pool: BackendPool | None = attrs.field(default=None, kw_only=True)
    #: Where this listener's sessions get their logged-in backends (``proxy.source``).
    backends: BackendSource = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.backends = ConnectingSource(
            self.listener,
            self.backend_ssl,
            self.provisioner,
            self.metrics,
            self.pbkdf2_limiter,
            pool=self.pool,
            end_bound=self.config.backend_end_timeout,
        )

    @property
    def allow_raw_sql(self) -> bool:
        return self.config.allow_raw_sql(self.listener)
