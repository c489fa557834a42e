"""Admin sessions: pg8000 connections in worker threads (docs/design.md).

One small pool of idle connections per target database (grants must run
connected to the client's database) plus dedicated connections handed out for
session-level locks. A pooled session idle for ``idle_timeout`` is closed
(:meth:`AdminPools.expire_idle`, run by :meth:`AdminPools.expire_idle_forever`
in the background), so no admin session lingers in a database it has no work
in: an idle session in a template database would make ``CREATE DATABASE``
from it fail, and one in any database blocks ``DROP DATABASE``. Every blocking call runs through
``trio.to_thread.run_sync(..., limiter=...)`` with one shared
:class:`trio.CapacityLimiter`. Each session is opened with
``statement_timeout``, ``lock_timeout``, ``search_path = pg_catalog, pg_temp``,
``standard_conforming_strings = on`` and ``application_name = 'waypoint-admin'`` in the
startup packet, so no
statement runs before they apply and nothing from a client's startup packet
ever reaches an admin session.
"""

from __future__ import annotations

import contextlib
import ssl
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, TypeVar

import pg8000.native
import trio
from pg8000.exceptions import DatabaseError, InterfaceError

from waypoint.config.model import ListenerConfig
from waypoint.observability.log import get_logger

log = get_logger("provision")

T = TypeVar("T")

APPLICATION_NAME: Final = "waypoint-admin"
MAX_IDLE_PER_DATABASE: Final = 4
MAX_OPEN_PER_DATABASE: Final = 8
IDLE_TIMEOUT: Final = 60.0


AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10


def admin_auth_refusal(
    code: int, mechanisms: list[str], *, tls: bool, verified: bool
) -> str | None:
    """Why the admin password must not answer this authentication request, or ``None``.

    Over a TLS link whose server is not verified (``backend_tls`` = ``prefer``, ``require``,
    ``verify-ca``), whoever holds the other end may be a man in the middle with any
    certificate: it must get neither the password (cleartext), nor a replayable hash of it
    (MD5), nor a SCRAM exchange it could relay to the real server (SCRAM without channel
    binding). Only SCRAM-SHA-256-PLUS, bound to the certificate the link actually presents,
    is safe there. Over ``verify-full`` the server is authenticated, and the server's own
    choice stands; over a plaintext link (``disable``) the operator chose no protection.
    """
    if not tls or verified:
        return None
    if code == AUTH_CLEARTEXT:
        what = "a cleartext password"
    elif code == AUTH_MD5:
        what = "an MD5 password"
    elif code == AUTH_SASL and "SCRAM-SHA-256-PLUS" not in mechanisms:
        what = "SCRAM without channel binding (offered: " + ", ".join(mechanisms) + ")"
    else:
        return None
    return (
        f"the backend asked the admin login for {what} over a TLS link whose server is not "
        "verified; refusing, because a man in the middle could take the password. Use "
        "backend_tls = verify-full, or scram-sha-256 for the admin in pg_hba.conf"
    )


class _FailClosedConnection(pg8000.native.Connection):  # type: ignore[misc]
    """pg8000's connection, refusing what :func:`admin_auth_refusal` refuses before it
    answers an authentication request (pg8000 itself answers whatever the server asks)."""

    def handle_AUTHENTICATION_REQUEST(self, data: bytes, context: Any) -> None:
        (code,) = struct.unpack_from("!i", data)
        mechanisms = (
            [m.decode("ascii", "replace") for m in bytes(data[4:]).split(b"\0") if m]
            if code == AUTH_SASL
            else []
        )
        sock = getattr(self, "_usock", None)
        tls = isinstance(sock, ssl.SSLSocket)
        verified = (
            isinstance(sock, ssl.SSLSocket)
            and sock.context.verify_mode == ssl.CERT_REQUIRED
            and sock.context.check_hostname
        )
        refusal = admin_auth_refusal(code, mechanisms, tls=tls, verified=verified)
        if refusal is not None:
            raise InterfaceError(refusal)
        super().handle_AUTHENTICATION_REQUEST(data, context)


class AdminError(Exception):
    """An admin statement or connection failed. ``fields`` are the server's error fields.

    ``sqlstate`` is the server's code (``fields['C']``) or ``None`` for a connection
    failure without an ErrorResponse. The message never carries SQL text.
    """

    def __init__(self, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields: dict[str, str] = dict(fields or {})

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")


class AdminConnectionLost(AdminError):
    """The admin connection broke (network error, server restart): no server error fields."""


CONNECTION_ERRORS: Final = (InterfaceError, OSError, struct.error)


def error_fields(exc: BaseException) -> dict[str, str]:
    """The server's ErrorResponse fields of a pg8000 DatabaseError (``args[0]``), else {}."""
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        return {str(k): str(v) for k, v in exc.args[0].items()}
    return {}


def wrap_error(exc: BaseException, what: str) -> AdminError:
    fields = error_fields(exc)
    if fields:
        return AdminError(
            f"{what}: {fields.get('S', 'ERROR')} {fields.get('C', '?')} {fields.get('M', '')}",
            fields,
        )
    return AdminError(f"{what}: {type(exc).__name__}: {exc}")


def build_ssl_context(listener: ListenerConfig) -> ssl.SSLContext | bool | None:
    """pg8000's ``ssl_context`` for ``backend_tls``: False = no TLS, None = prefer."""
    mode = listener.backend_tls
    if mode == "disable":
        return False
    if mode == "prefer":
        return None
    ctx = ssl.create_default_context()
    if mode == "require":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if listener.backend_ca_file:
        ctx.load_verify_locations(cafile=listener.backend_ca_file)
    ctx.check_hostname = mode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class AdminSession:
    """One pg8000 connection, used by one thread at a time. Not thread-safe by itself."""

    def __init__(self, conn: pg8000.native.Connection, database: str) -> None:
        self._conn = conn
        self.database = database
        self.broken = False
        # True once the session has been handed out of an idle pool: it may have died while
        # idle (a server restart), which only the next statement can tell.
        self.reused = False
        # ``trio.current_time()`` when it last went back to an idle pool.
        self.idle_since = 0.0

    def run(self, sql: str, **params: Any) -> list[list[Any]]:
        """Run one statement (blocking). Marks the session broken on a connection error."""
        try:
            rows = self._conn.run(sql, **params)
        except DatabaseError as exc:
            if error_fields(exc).get("V", error_fields(exc).get("S")) in ("FATAL", "PANIC"):
                self.broken = True
            raise
        except (InterfaceError, OSError, struct.error):
            self.broken = True
            raise
        return list(rows) if rows is not None else []

    def rollback_quietly(self) -> None:
        if self.broken:
            return
        try:
            self._conn.run("ROLLBACK")
        except Exception:
            self.broken = True

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self._conn.close()


class AdminPools:
    """Admin connections for one listener: idle pools per database, dedicated lock sessions."""

    def __init__(
        self,
        listener: ListenerConfig,
        *,
        limiter: trio.CapacityLimiter,
        connect_timeout: float,
        statement_timeout: float = 10.0,
        lock_timeout: float = 5.0,
        max_idle_per_database: int = MAX_IDLE_PER_DATABASE,
        max_open_per_database: int = MAX_OPEN_PER_DATABASE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be greater than 0")
        self._listener = listener
        self._limiter = limiter
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._lock_timeout = lock_timeout
        self._max_idle = max_idle_per_database
        self._idle: dict[str, list[AdminSession]] = defaultdict(list)
        self._max_open = max_open_per_database
        # Bounds the pooled (DDL) sessions checked out per database; waits are bounded by
        # the caller's cancel scope (the handshake deadline).
        self._slots: dict[str, trio.Semaphore] = {}
        self._ssl_context = build_ssl_context(listener)
        self._closed = False
        self._idle_timeout = idle_timeout

    @property
    def limiter(self) -> trio.CapacityLimiter:
        return self._limiter

    @property
    def admin_database(self) -> str:
        return self._listener.postgres.admin_database

    def _options(self) -> str:
        st = max(1, int(self._statement_timeout * 1000))
        lt = max(1, int(self._lock_timeout * 1000))
        # standard_conforming_strings: the literals of admin SQL (pg8000's ``literal()``:
        # markers, settings) are plain ``'...'``, read with backslash escapes where a server,
        # database or role default turns it off; a marker's JSON escapes would then break.
        return (
            f"-c statement_timeout={st} -c lock_timeout={lt} "
            "-c search_path=pg_catalog,pg_temp -c idle_in_transaction_session_timeout="
            f"{st * 2} -c standard_conforming_strings=on"
        )

    def _connect_blocking(self, database: str) -> AdminSession:
        host, port = self._listener.backend_address
        pgc = self._listener.postgres
        # The socket timeout bounds connect and every read; statement_timeout fires first.
        timeout = max(self._connect_timeout, self._statement_timeout + 5.0)
        try:
            conn = _FailClosedConnection(
                user=pgc.admin_user,
                password=pgc.admin_password,
                host=host,
                port=port,
                database=database,
                ssl_context=self._ssl_context,
                timeout=timeout,
                application_name=APPLICATION_NAME,
                startup_params={"options": self._options()},
            )
        except DatabaseError as exc:
            raise wrap_error(exc, f"admin connection to database {database!r} failed") from None
        except (InterfaceError, OSError, ssl.SSLError) as exc:
            raise AdminError(
                f"admin connection to database {database!r} at {host}:{port} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return AdminSession(conn, database)

    async def connect(self, database: str) -> AdminSession:
        """A new dedicated session (not pooled), bounded by the connect timeout."""
        if self._closed:
            raise AdminError("admin pools are closed")
        with trio.fail_after(self._connect_timeout + self._statement_timeout + 5.0):
            return await trio.to_thread.run_sync(
                self._connect_blocking, database, limiter=self._limiter
            )

    async def call(self, session: AdminSession, fn: Callable[[AdminSession], T]) -> T:
        """Run ``fn(session)`` in a worker thread under the limiter."""
        return await trio.to_thread.run_sync(fn, session, limiter=self._limiter)

    @contextlib.asynccontextmanager
    async def session(self, database: str) -> AsyncIterator[AdminSession]:
        """Check out a pooled session for ``database``; broken ones are discarded."""
        slots = self._slots.get(database)
        if slots is None:
            slots = self._slots[database] = trio.Semaphore(self._max_open)
        async with slots:
            idle = self._idle[database]
            if idle:
                sess = idle.pop()
                sess.reused = True
            else:
                sess = await self.connect(database)
            try:
                yield sess
            finally:
                if sess.broken or self._closed or len(self._idle[database]) >= self._max_idle:
                    await self.close_session(sess)
                else:
                    sess.idle_since = trio.current_time()
                    self._idle[database].append(sess)

    @property
    def idle_timeout(self) -> float:
        return self._idle_timeout

    def idle_count(self, database: str) -> int:
        """How many idle sessions the pool keeps for ``database``."""
        return len(self._idle.get(database, ()))

    async def expire_idle(self) -> int:
        """Close every pooled session idle for ``idle_timeout`` or longer; how many."""
        cutoff = trio.current_time() - self._idle_timeout
        expired: list[AdminSession] = []
        for database in list(self._idle):
            keep = [s for s in self._idle[database] if s.idle_since > cutoff]
            expired += [s for s in self._idle[database] if s.idle_since <= cutoff]
            if keep:
                self._idle[database] = keep
            else:
                del self._idle[database]
        for sess in expired:
            await self.close_session(sess)
        return len(expired)

    async def expire_idle_forever(self) -> None:
        """Every quarter of ``idle_timeout``, :meth:`expire_idle`: a session is closed at the
        latest ``1.25 * idle_timeout`` after it went idle."""
        while not self._closed:
            await trio.sleep(self._idle_timeout / 4)
            await self.expire_idle()

    async def close_session(self, sess: AdminSession) -> None:
        """Close in a worker thread (Terminate + socket close), shielded and bounded."""
        with trio.move_on_after(2.0) as scope:
            scope.shield = True
            await trio.to_thread.run_sync(sess.close, limiter=self._limiter)
        sess.broken = True

    async def run(self, database: str, fn: Callable[[AdminSession], T]) -> T:
        """Run ``fn`` on a pooled session of ``database`` in one worker-thread hop.

        On a server error the transaction is rolled back (in the same hop) and the
        error re-raised as :class:`AdminError` with the server's fields.
        """

        def guarded(sess: AdminSession) -> T:
            try:
                return fn(sess)
            except DatabaseError as exc:
                sess.rollback_quietly()
                raise wrap_error(exc, "admin statement failed") from None
            except AdminError:
                sess.rollback_quietly()
                raise
            except CONNECTION_ERRORS as exc:
                sess.close()
                raise AdminConnectionLost(
                    f"admin connection lost: {type(exc).__name__}: {exc}"
                ) from None
            except BaseException:
                sess.rollback_quietly()
                raise

        # A pooled session may have died while idle (the server restarted): that failure
        # happens before anything ran, so the work is retried once on a fresh connection.
        # ``fn`` is one transaction; a connection lost mid-transaction rolled it back.
        while True:
            async with self.session(database) as sess:
                try:
                    return await self.call(sess, guarded)
                except AdminConnectionLost:
                    if not sess.reused:
                        raise
            log.info("admin_session_dead", listener=self._listener.name, db=database)

    async def aclose(self) -> None:
        self._closed = True
        sessions = [s for lst in self._idle.values() for s in lst]
        self._idle.clear()
        for sess in sessions:
            await self.close_session(sess)
