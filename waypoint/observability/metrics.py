"""Prometheus metrics (docs/observability.md). One registry per app, so tests can run several apps.

No per-user label by default (cardinality): listeners, outcomes and SQLSTATEs only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: The ``outcome`` label values of ``waypoint_config_reloads_total``.
RELOAD_OUTCOMES = ("applied", "invalid", "failed")

_HANDSHAKE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections_active = Gauge(
            "waypoint_connections_active", "Client connections open now", ["listener"], registry=r
        )
        self.connections_total = Counter(
            "waypoint_connections", "Client connections accepted", ["listener"], registry=r
        )
        self.sessions_total = Counter(
            "waypoint_sessions_ended",
            "Connections ended, by outcome",
            ["listener", "outcome"],
            registry=r,
        )
        self.refused_total = Counter(
            "waypoint_connections_refused",
            "Connections refused before the relay, by SQLSTATE",
            ["listener", "sqlstate"],
            registry=r,
        )
        self.handshake_seconds = Histogram(
            "waypoint_handshake_seconds",
            "Time from accept to ReadyForQuery",
            ["listener"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.provision_seconds = Histogram(
            "waypoint_provision_seconds",
            "Time of provisions that ran (not cached)",
            ["listener"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.provision_errors = Counter(
            "waypoint_provision_errors", "Provisions that failed", ["listener"], registry=r
        )
        self.backend_login_failures = Counter(
            "waypoint_backend_login_failures",
            "Backend logins that failed",
            ["listener"],
            registry=r,
        )
        self.pool_idle = Gauge(
            "waypoint_pool_idle",
            "Idle backends kept in the pool now (they count toward no client limit)",
            ["listener"],
            registry=r,
        )
        self.pool_hits = Counter(
            "waypoint_pool_hits",
            "Sessions given a pooled backend (checked, with a cancel key of their own)",
            ["listener"],
            registry=r,
        )
        self.pool_misses = Counter(
            "waypoint_pool_misses",
            "Sessions that found no pooled backend for their key and logged in",
            ["listener"],
            registry=r,
        )
        self.pool_resets = Counter(
            "waypoint_pool_resets",
            "Resets of backends a session left idle, by outcome (ok: pooled; failed: closed)",
            ["listener", "outcome"],
            registry=r,
        )
        self.pool_closes = Counter(
            "waypoint_pool_closes",
            "Backends closed instead of pooled or kept, by reason",
            ["listener", "reason"],
            registry=r,
        )
        self.bytes_total = Counter(
            "waypoint_relayed_bytes",
            "Bytes relayed, by direction",
            ["listener", "direction"],
            registry=r,
        )
        self.client_tls_relays = Counter(
            "waypoint_client_tls_relays",
            "Relays of TLS clients, by where their TLS record layer runs: c (the relay engine's"
            " C loop), python (the engine thread in Python: an audited session, or an OpenSSL"
            " the C loop cannot take over), stream (the trio stream relay: a TLS backend link)",
            ["listener", "record_layer"],
            registry=r,
        )
        self.revalidation_runs = Counter(
            "waypoint_revalidation_runs", "Revalidation passes", registry=r
        )
        self.revalidation_failures = Counter(
            "waypoint_revalidation_failures",
            "Sessions whose revalidation failed or revoked access",
            ["listener", "reason"],
            registry=r,
        )
        self.backend_ends = Counter(
            "waypoint_backend_ends",
            "Backends ended by Waypoint: why the session (or orphan) ended, and how the backend "
            "was stopped (backend_closed, terminate, cancel, pg_terminate_backend, unconfirmed)",
            ["listener", "reason", "how"],
            registry=r,
        )
        self.reaper_runs = Counter(
            "waypoint_reaper_runs", "Reaper passes", ["listener"], registry=r
        )
        self.reaper_dropped = Counter(
            "waypoint_reaper_dropped_roles", "Roles dropped by the reaper", ["listener"], registry=r
        )
        self.reaper_errors = Counter(
            "waypoint_reaper_errors", "Roles the reaper failed to drop", ["listener"], registry=r
        )

        self.cancel_requests = Counter(
            "waypoint_cancel_requests",
            "CancelRequests received, by outcome",
            ["listener", "outcome"],
            registry=r,
        )
        self.handshakes_refused = Counter(
            "waypoint_handshakes_refused",
            "Connections closed at accept because their source address had"
            " max_handshakes_per_address connections in their handshake",
            ["listener"],
            registry=r,
        )
        self.accept_errors = Counter(
            "waypoint_accept_errors",
            "Transient accept() failures (each followed by a bounded back-off), by errno",
            ["listener", "errno"],
            registry=r,
        )
        self.readiness_checks = Counter(
            "waypoint_readiness_checks",
            "Readiness dependency checks run for /readyz, by check and outcome (ok, failed)",
            ["check", "outcome"],
            registry=r,
        )

        self.audit_records = Counter(
            "waypoint_audit_records",
            "Statement audit records written to the sink (none is ever dropped)",
            registry=r,
        )
        self.audit_blocked_seconds = Counter(
            "waypoint_audit_blocked_seconds",
            "Time sessions spent waiting for the audit sink (on_error = block)",
            registry=r,
        )
        self.audit_sink_errors = Counter(
            "waypoint_audit_sink_errors",
            "Failed writes to the audit sink (each retried)",
            registry=r,
        )
        self.audit_sessions_closed = Counter(
            "waypoint_audit_sessions_closed",
            "Sessions ended because the audit sink could not take their records (on_error = close)",
            registry=r,
        )
        self.config_reloads = Counter(
            "waypoint_config_reloads",
            "Configuration reloads (SIGHUP), by outcome: applied, invalid (the file did not"
            " validate; nothing changed), failed (it could not be applied; nothing changed)",
            ["outcome"],
            registry=r,
        )
        for outcome in RELOAD_OUTCOMES:
            self.config_reloads.labels(outcome)
        self.config_info = Gauge(
            "waypoint_config_info",
            "Always 1; hash is the SHA-256 of the configuration in force as `waypoint check`"
            " prints it (secrets masked)",
            ["hash"],
            registry=r,
        )

    # -- the calls the session makes ------------------------------------------------
    def backend_ended(self, listener: str, reason: str, how: str, count: int = 1) -> None:
        """Backends ended (``how``) because their session, or orphan, ended (``reason``)."""
        self.backend_ends.labels(listener, reason, how).inc(count)

    def connection_opened(self, listener: str) -> None:
        self.connections_total.labels(listener).inc()
        self.connections_active.labels(listener).inc()

    def connection_closed(
        self, listener: str, outcome: str, sqlstate: str | None, bytes_in: int, bytes_out: int
    ) -> None:
        self.connections_active.labels(listener).dec()
        self.sessions_total.labels(listener, outcome).inc()
        if bytes_in:
            self.bytes_total.labels(listener, "client_to_backend").inc(bytes_in)
        if bytes_out:
            self.bytes_total.labels(listener, "backend_to_client").inc(bytes_out)

    def client_tls_relayed(self, listener: str, record_layer: str) -> None:
        """A relay of a TLS client started; its record layer runs in ``record_layer``."""
        self.client_tls_relays.labels(listener, record_layer).inc()

    def refused(self, listener: str, sqlstate: str) -> None:
        self.refused_total.labels(listener, sqlstate).inc()

    def handshake_done(self, listener: str, seconds: float) -> None:
        self.handshake_seconds.labels(listener).observe(seconds)

    def provisioned(self, listener: str, seconds: float) -> None:
        self.provision_seconds.labels(listener).observe(seconds)

    def provision_failed(self, listener: str) -> None:
        self.provision_errors.labels(listener).inc()

    def backend_login_failed(self, listener: str) -> None:
        self.backend_login_failures.labels(listener).inc()

    def pool_idle_now(self, listeners: Iterable[str], counts: Mapping[str, int]) -> None:
        """The idle gauge of each of ``listeners`` from ``counts`` (absent: 0)."""
        for listener in listeners:
            self.pool_idle.labels(listener).set(counts.get(listener, 0))

    def pool_taken(self, listener: str, *, hit: bool) -> None:
        (self.pool_hits if hit else self.pool_misses).labels(listener).inc()

    def pool_reset(self, listener: str, *, ok: bool) -> None:
        self.pool_resets.labels(listener, "ok" if ok else "failed").inc()

    def pool_closed(self, listener: str, reason: str) -> None:
        self.pool_closes.labels(listener, reason).inc()

    def cancel_request(self, listener: str, outcome: str) -> None:
        self.cancel_requests.labels(listener, outcome).inc()

    def handshake_refused(self, listener: str) -> None:
        self.handshakes_refused.labels(listener).inc()

    def accept_failed(self, listener: str, errno_name: str) -> None:
        self.accept_errors.labels(listener, errno_name).inc()

    def readiness_checked(self, check: str, outcome: str) -> None:
        self.readiness_checks.labels(check, outcome).inc()

    def config_reloaded(self, outcome: str) -> None:
        self.config_reloads.labels(outcome).inc()

    def config_loaded(self, config_hash: str, *, previous: str | None = None) -> None:
        """The info metric names ``config_hash`` (and no longer ``previous``)."""
        if previous is not None and previous != config_hash:
            with contextlib.suppress(KeyError):
                self.config_info.remove(previous)
        self.config_info.labels(config_hash).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
