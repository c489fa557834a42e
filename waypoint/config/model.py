"""The configuration as typed values (docs/configuration.md). Durations are float seconds, sizes int bytes.

Every ``float`` field is a duration (written as ``"90s"`` in TOML); ``int``
fields with ``metadata={"unit": "size"}`` are sizes (``"10GB"`` or bytes).

Loading, ``${VAR}`` expansion, strict structuring and error messages live in
``waypoint.config.load``; this module only describes the shape and defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from attrs import field, frozen

ProviderName = Literal["tailscale", "static"]
TlsMode = Literal["off", "optional", "require"]
BackendTls = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]
PasswordEncryption = Literal["auto", "scram-sha-256", "md5"]
StateBackend = Literal["memory", "redis"]
ListenerMode = Literal["postgres"]
AuditSinkName = Literal["file", "stdout"]
AuditParameters = Literal["none", "hash", "full"]
AuditOnError = Literal["block", "close"]
LogFormat = Literal["human", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


@frozen
class StaticIdentity:
    """One ``[[identity.static]]`` entry: peers in ``cidr`` are this identity."""

    cidr: str
    login: str
    node: str
    tags: tuple[str, ...] = ()
    # The capability rules (same JSON shape as a Tailscale grant element).
    # Given either as inline TOML (``grants``) or a JSON string (``grants_json``);
    # the loader normalizes both into ``grants``.
    grants: tuple[Any, ...] = ()
    grants_json: str | None = None


@frozen
class IdentityConfig:
    provider: ProviderName = "tailscale"
    socket: str = "/var/run/tailscale/tailscaled.sock"
    capability: str = "redo.com/cap/waypoint"
    timeout: float = 5.0
    static: tuple[StaticIdentity, ...] = ()


@frozen
class RevalidationConfig:
    interval: float = 60.0  # 0 disables


@frozen
class ProvisioningConfig:
    allow_raw_sql: bool = False


@frozen
class LimitsConfig:
    max_conns_total: int = 1000
    max_conns_per_user: int = 0
    max_conn_duration: float = 0.0
    # A size: the loader accepts integers (bytes) or strings such as "10GB".
    max_bytes_per_conn: int = field(default=0, metadata={"unit": "size"})


@frozen
class DefaultsConfig:
    limits: LimitsConfig = field(factory=LimitsConfig)


@frozen
class StateConfig:
    backend: StateBackend = "memory"
    url: str | None = field(default=None, repr=False)
    # A file holding ``url`` (it carries the Redis password); read at every load.
    url_file: str | None = None
    key_prefix: str = "waypoint:"
    lease: float = 30.0
    # Highly available Redis (docs/scaling.md): Sentinel, or Cluster. Exactly one of ``url``,
    # ``sentinels`` and ``cluster = true`` names where Redis is.
    sentinels: tuple[str, ...] = ()
    service_name: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_password_file: str | None = None
    cluster: bool = False
    nodes: tuple[str, ...] = ()
    # The Redis servers' credentials with ``sentinels`` or ``cluster`` (``url`` carries its own).
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None  # files holding them; read at every load
    # TLS to the Redis servers and Sentinels with ``sentinels`` or ``cluster`` (``url`` says
    # rediss://); certificates are verified against ``tls_ca_file`` or the system's store.
    tls: bool = False
    tls_ca_file: str | None = None

    @property
    def redis_mode(self) -> Literal["url", "sentinel", "cluster"]:
        """Where Redis is: one server (``url``), Sentinel, or Cluster."""
        if self.cluster:
            return "cluster"
        if self.sentinels:
            return "sentinel"
        return "url"


@frozen
class AdmissionConfig:
    """Bounds on what a peer can make Waypoint hold before its identity is known."""

    # Connections from one source address still in their handshake (accepted, not yet
    # relaying); one more is closed at once.
    max_handshakes_per_address: int = 128
    # CancelRequests per source address: a bucket of ``cancel_burst`` tokens, one token
    # back every ``cancel_interval``.
    cancel_burst: int = 20
    cancel_interval: float = 0.2


@frozen
class AuditConfig:
    """Statement audit (off by default): every statement, with who sent it."""

    enabled: bool = False
    sink: AuditSinkName = "file"
    file: str | None = None
    # Past this size the file is rotated (file.1 ... file.<keep>).
    max_size: int = field(default=100 * 1024 * 1024, metadata={"unit": "size"})
    keep: int = 10
    parameters: AuditParameters = "none"
    # Statement texts and parameters longer than this are cut (marked, with their SHA-256).
    max_statement_bytes: int = field(default=64 * 1024, metadata={"unit": "size"})
    # What a session's prepared statements (and, apart, its portals) may hold in Waypoint;
    # past it the oldest texts are kept as their SHA-256 only.
    max_session_statement_bytes: int = field(default=4 * 1024 * 1024, metadata={"unit": "size"})
    on_error: AuditOnError = "block"


@frozen
class MetricsConfig:
    listen: str | None = None
    # Bound on each /readyz dependency check (they run concurrently): one without an answer
    # by then fails.
    readiness_timeout: float = 2.0


@frozen
class LogConfig:
    """Log lines; both switch at once on a reload."""

    # Unset: the ``--log-format`` flag of ``waypoint run`` (human by default).
    format: LogFormat | None = None
    level: LogLevel = "info"


@frozen
class PostgresListenerConfig:
    admin_user: str
    # Required: given here, or read from ``admin_password_file`` by the loader.
    admin_password: str = field(repr=False)
    admin_password_file: str | None = None
    admin_database: str = "postgres"
    user_prefix: str = "wp_"
    user_ttl: float = 86400.0
    allow_raw_sql: bool | None = None
    password_encryption: PasswordEncryption = "auto"
    reap_interval: float | None = None
    reassign_to: str | None = None
    reap_on_cockroachdb: bool = False
    admin_idle_timeout: float = 60.0
    #: ``ALTER ROLE ... SET client_connection_check_interval`` on provisioned roles (14+); 0: unset.
    client_connection_check_interval: float = 5.0

    @property
    def effective_reap_interval(self) -> float:
        if self.reap_interval is not None:
            return self.reap_interval
        return min(self.user_ttl / 4, 3600.0)


def split_host_port(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port). Raises ValueError."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ValueError(f"{value!r} is not host:port")
        host, port_s = value[1:end], value[end + 2 :]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"{value!r} is not host:port")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{value!r} has no valid port")
    return host, int(port_s)


@frozen
class ListenerConfig:
    name: str
    listen: str
    backend: str
    postgres: PostgresListenerConfig
    mode: ListenerMode = "postgres"
    tls_mode: TlsMode = "optional"
    use_tailscale_tls: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    backend_tls: BackendTls = "prefer"
    backend_ca_file: str | None = None
    #: The virtual database Waypoint itself answers on this listener (the console).
    console_database: str = "waypoint"
    #: Session pooling per provisioned role (docs/architecture.md#backend-pooling): a backend
    #: left idle by a clean session end is reset and kept for the same role's next connection.
    pool: bool = True
    #: A pooled backend unused this long is closed.
    pool_idle_timeout: float = 60.0
    #: A backend is pooled no longer than this after its login.
    pool_max_lifetime: float = 3600.0
    #: Idle pooled backends per role, at most.
    pool_max_per_role: int = 8
    #: Idle pooled backends per backend server, at most: this share of its max_connections.
    pool_max_idle: float = field(default=0.25, metadata={"unit": "share"})
    #: Sent before a backend is pooled; it must end with the backend idle, within the bound.
    pool_reset_query: str = "DISCARD ALL"
    pool_reset_timeout: float = 2.0

    @property
    def listen_address(self) -> tuple[str, int]:
        return split_host_port(self.listen)

    @property
    def backend_address(self) -> tuple[str, int]:
        return split_host_port(self.backend)


@frozen
class Config:
    listeners: tuple[ListenerConfig, ...] = ()
    handshake_timeout: float = 15.0
    drain_timeout: float = 30.0
    # After a shutdown signal, how long /readyz answers 503 while listeners still accept.
    drain_delay: float = 0.0
    #: How long the end of a session may take to stop its backend's work before the admin
    #: terminates it (``pg_terminate_backend``).
    backend_end_timeout: float = 2.0
    identity: IdentityConfig = field(factory=IdentityConfig)
    revalidation: RevalidationConfig = field(factory=RevalidationConfig)
    provisioning: ProvisioningConfig = field(factory=ProvisioningConfig)
    defaults: DefaultsConfig = field(factory=DefaultsConfig)
    state: StateConfig = field(factory=StateConfig)
    admission: AdmissionConfig = field(factory=AdmissionConfig)
    metrics: MetricsConfig = field(factory=MetricsConfig)
    audit: AuditConfig = field(factory=AuditConfig)
    log: LogConfig = field(factory=LogConfig)
    # ``waypoint run`` writes its process id here (``waypoint reload`` signals it); unset: none.
    pid_file: str | None = None
    # Where the file came from (for messages); not a TOML key.
    source: str | None = field(default=None, eq=False)

    def allow_raw_sql(self, listener: ListenerConfig) -> bool:
        """The per-listener override of ``[provisioning] allow_raw_sql``."""
        if listener.postgres.allow_raw_sql is not None:
            return listener.postgres.allow_raw_sql
        return self.provisioning.allow_raw_sql

    def listener(self, name: str) -> ListenerConfig:
        for lst in self.listeners:
            if lst.name == name:
                return lst
        raise KeyError(name)
