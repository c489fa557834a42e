"""What a provision needs to know of the server, asked once per provisioner: its dialect and
its ``password_encryption``; and what follows from them (md5 or SCRAM verifiers, per-role
settings)."""

from __future__ import annotations

from attrs import frozen

from waypoint.config.model import PostgresListenerConfig
from waypoint.provision import sql
from waypoint.provision.admin import AdminSession
from waypoint.provision.dialect import Dialect, PostgresDialect


@frozen
class ServerInfo:
    dialect: Dialect
    password_encryption: str


def probe_server(sess: AdminSession) -> tuple[str, str]:
    """``version()`` and ``password_encryption`` (blocking; in a worker thread)."""
    rows = sess.run(
        "SELECT pg_catalog.version(), pg_catalog.current_setting('password_encryption', true)"
    )
    return str(rows[0][0]), str(rows[0][1] or "scram-sha-256")


def role_settings(pg: PostgresListenerConfig, role: str, info: ServerInfo) -> tuple[str, ...]:
    """Per-role settings: ``client_connection_check_interval`` (PostgreSQL 14+), so a
    backend whose client is gone notices it during a long statement. A first line only:
    the caller can change it for its own session, and Waypoint's session end does not
    rely on it."""
    interval = pg.client_connection_check_interval
    dialect = info.dialect
    if interval <= 0 or not isinstance(dialect, PostgresDialect) or dialect.major < 14:
        return ()
    return (
        sql.set_role_setting(role, "client_connection_check_interval", f"{interval * 1000:.0f}ms"),
    )


def use_md5(pg: PostgresListenerConfig, info: ServerInfo) -> bool:
    """Whether the role's verifier is md5: as configured, or as the server's own setting."""
    mode = pg.password_encryption
    if mode == "md5":
        return True
    if mode == "scram-sha-256":
        return False
    return info.password_encryption.lower() == "md5"
