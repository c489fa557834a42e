"""Client-facing refusals: one table of SQLSTATEs and messages (docs/troubleshooting.md).

Every error a client sees is built here, as data: the SQLSTATE, the message the
client reads, and a log-only ``detail`` that never leaves the process.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class Refusal:
    """Why a connection (or a session) is refused. ``detail`` is for logs only."""

    sqlstate: str
    message: str
    detail: str = ""
    hint: str | None = None

    def with_detail(self, detail: str) -> Refusal:
        return Refusal(self.sqlstate, self.message, detail, self.hint)


# SQLSTATE codes used by Waypoint (one place).
NOT_AUTHORIZED = "28000"
DB_NOT_AUTHORIZED = "42501"
NAME_TOO_LONG = "42622"
BAD_PARAMETER = "22023"
TOO_MANY_CONNECTIONS = "53300"
BACKEND_UNAVAILABLE = "08006"
LOGIN_FAILED = "08004"
PROVISIONING_FAILED = "58000"
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
SHUTDOWN = "57P01"
LIMIT_REACHED = "53400"


def not_authorized_listener(listener: str, detail: str = "") -> Refusal:
    return Refusal(
        NOT_AUTHORIZED,
        f'not authorized: your Tailscale identity has no Waypoint grant for listener "{listener}"',
        detail,
    )


def unknown_peer(detail: str = "") -> Refusal:
    return Refusal(
        NOT_AUTHORIZED,
        "not authorized: the connecting address is not a known Tailscale peer",
        detail,
    )


def not_authorized_database(database: str, listener: str, detail: str = "") -> Refusal:
    return Refusal(
        DB_NOT_AUTHORIZED,
        f'not authorized for database "{database}" on listener "{listener}"',
        detail,
    )


def reserved_database(database: str, listener: str, what: str, detail: str = "") -> Refusal:
    return Refusal(
        DB_NOT_AUTHORIZED,
        f'not authorized for database "{database}" on listener "{listener}": it is {what}, '
        "which Waypoint reserves and never grants",
        detail,
    )


def database_name_too_long(database: str, size: int, limit: int) -> Refusal:
    return Refusal(
        NAME_TOO_LONG,
        f"database name is {size} bytes long; PostgreSQL names are at most {limit} bytes "
        "and Waypoint does not let the server cut a longer one to another database's name",
    )


def bad_preset(message: str, detail: str = "") -> Refusal:
    return Refusal(BAD_PARAMETER, message, detail)


def bad_grant(message: str, detail: str = "") -> Refusal:
    """The caller's capability grant itself is malformed (fix the policy file)."""
    return Refusal(NOT_AUTHORIZED, f"not authorized: invalid Waypoint grant: {message}", detail)


def raw_sql_not_allowed(listener: str, detail: str = "") -> Refusal:
    return Refusal(
        DB_NOT_AUTHORIZED,
        f'your grant carries raw SQL, which listener "{listener}" does not allow '
        "(allow_raw_sql is off)",
        detail,
    )


def limit_reached(which: str, value: int, detail: str = "") -> Refusal:
    return Refusal(
        TOO_MANY_CONNECTIONS,
        f"too many connections: limit {which} = {value} reached",
        detail,
    )


def backend_unavailable(listener: str, detail: str = "") -> Refusal:
    return Refusal(
        BACKEND_UNAVAILABLE,
        f'backend of listener "{listener}" is unavailable',
        detail,
    )


def backend_login_failed(detail: str = "") -> Refusal:
    return Refusal(
        LOGIN_FAILED,
        "Waypoint could not log in to the backend as your provisioned role",
        detail,
    )


def identity_unavailable(what: str, detail: str = "") -> Refusal:
    """The identity provider (tailscaled, or its certificate service) is unavailable."""
    return dependency_unavailable(what, detail)


def state_unavailable(detail: str = "") -> Refusal:
    """The shared state store (Redis) is unavailable: no slot can be counted."""
    return dependency_unavailable("shared state (Redis)", detail)


def dependency_unavailable(what: str, detail: str = "") -> Refusal:
    return Refusal(
        LOGIN_FAILED,
        f"{what} is unavailable; Waypoint refuses connections until it is back",
        detail,
    )


def provisioning_failed(conn_id: str, detail: str = "") -> Refusal:
    # The log-only detail carries the correlation id too, so every log line that records this
    # refusal can be found from the id the client was shown.
    return Refusal(
        PROVISIONING_FAILED,
        f"provisioning your database role failed (correlation id {conn_id})",
        f"correlation id {conn_id}: {detail}" if detail else f"correlation id {conn_id}",
    )


def protocol_violation(message: str, detail: str = "") -> Refusal:
    return Refusal(PROTOCOL_VIOLATION, message, detail)


def unsupported_protocol(message: str, detail: str = "") -> Refusal:
    return Refusal(FEATURE_NOT_SUPPORTED, message, detail)


def tls_required(reason: str | None = None) -> Refusal:
    msg = "TLS is required by this Waypoint listener"
    if reason:
        msg = f"{msg} ({reason})"
    return Refusal(NOT_AUTHORIZED, msg)


def replication_refused() -> Refusal:
    return Refusal(FEATURE_NOT_SUPPORTED, "replication connections are not supported by Waypoint")


def shutting_down() -> Refusal:
    return Refusal(SHUTDOWN, "Waypoint is shutting down; the session was ended at the drain deadline")


def listener_removed() -> Refusal:
    return Refusal(
        SHUTDOWN,
        "this listener was removed from Waypoint's configuration;"
        " the session was ended at the drain deadline",
    )


def not_accepting() -> Refusal:
    return Refusal(SHUTDOWN, "Waypoint is shutting down and accepts no new connections")


def session_limit(which: str, value: str) -> Refusal:
    return Refusal(LIMIT_REACHED, f"session ended: {which} ({value}) reached")


def access_revoked(reason: str) -> Refusal:
    return Refusal(NOT_AUTHORIZED, f"session ended: access revoked on revalidation ({reason})")


def console_not_authorized(listener: str, detail: str = "") -> Refusal:
    return Refusal(
        NOT_AUTHORIZED,
        f'not authorized for the Waypoint console on listener "{listener}"',
        detail,
        hint='the grant needs "console": "read" or "admin" for this listener',
    )


def killed_by(who: str, reason: str = "") -> Refusal:
    """A session ended from the console (``KILL``, or a ``LOCK`` on its identity)."""
    why = f": {reason}" if reason else ""
    return Refusal(SHUTDOWN, f"session ended by {who} from the Waypoint console{why}")


def login_locked(principal: str, who: str, reason: str, until: str) -> Refusal:
    return Refusal(
        NOT_AUTHORIZED,
        f"not authorized: {principal} is locked by {who} (until {until}): {reason}",
    )


AUDIT_UNAVAILABLE = "58030"  # io_error


def audit_awaiting_limit(limit: int) -> Refusal:
    """A session with more statements waiting for the server's answers than the audit
    pairs (a pipeline sent without reading its results)."""
    return Refusal(
        LIMIT_REACHED,
        f"session ended: more than {limit} statements waiting for the server's answers "
        "(the statement audit pairs each with its result; read the results of a pipeline "
        "before sending more)",
    )


def audit_unavailable() -> Refusal:
    return Refusal(
        AUDIT_UNAVAILABLE,
        "session ended: the statement audit cannot record statements "
        '(audit sink failing or full, on_error = "close")',
    )
