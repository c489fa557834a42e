"""The client side of a backend connection's start, sans-IO: the SSLRequest answer
(:class:`SSLNegotiation`) and the startup (:class:`BackendStartup`: StartupMessage,
authentication through :class:`~waypoint.pgwire.login.UpstreamLogin`, the session start up
to ReadyForQuery), in the manner of h11: the caller feeds the bytes the backend sent and asks
what to do next; no sockets, no TLS, no threads.

Driven by trio in ``waypoint.proxy.backend`` (the login, and the TLS negotiation also used by
``waypoint.proxy.cancel``) and by byte lists in the tests::

    startup = BackendStartup(UpstreamLogin(role, secret), {"user": role, ...})
    while True:
        event = startup.next_event()
        if isinstance(event, SendBytes):
            sock.sendall(event.data)
        elif isinstance(event, NeedData):
            startup.receive_data(sock.recv(65536))   # (b"": the backend hung up)
        elif isinstance(event, DeriveKey):
            startup.derive_key()                     # PBKDF2: in a worker thread
        else:
            break                                    # event.start: ReadyForQuery came

What a backend may send before ReadyForQuery is small and known: authentication requests,
ParameterStatus, BackendKeyData, notices, an ErrorResponse. So a message during the start is
bounded by :data:`STARTUP_MAX_MESSAGE_SIZE` (the length word is checked before any of the body
is buffered) and the whole start by :data:`STARTUP_MAX_TOTAL`; a message of a type that does
not belong where it comes (a second AuthenticationOk, an authentication request after the
login, query results) is a protocol error. After any failure the object is in an error state:
every further call raises :class:`LoginError` naming the first failure.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

import attrs

from .errors import BackendError, LoginError, ProtocolError
from .framing import Message, MessageReader
from .login import Authenticated, Send, UpstreamLogin
from .messages import (
    BackendKeyData,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    ReadyForQuery,
    parse_backend_message,
)
from .startup import build_ssl_request, build_startup_message

__all__ = [
    "STARTUP_MAX_MESSAGE_SIZE",
    "STARTUP_MAX_TOTAL",
    "BackendSessionStart",
    "BackendStartup",
    "DeriveKey",
    "NeedData",
    "SSLNegotiation",
    "SendBytes",
    "Started",
]

#: The largest message a backend may send before ReadyForQuery (its length word included).
#: Authentication requests are a few hundred bytes; a ParameterStatus echoes at most what the
#: client's startup packet carried (PostgreSQL caps it at 10,000 bytes); notices and errors
#: are short texts.
STARTUP_MAX_MESSAGE_SIZE: Final = 32 * 1024
#: The most the backend may send in all before ReadyForQuery.
STARTUP_MAX_TOTAL: Final = 1024 * 1024


class _Failed:
    """Shared by both machines: the first failure is kept, and every later call raises."""

    _error: Exception | None = None

    def _check(self) -> None:
        if self._error is not None:
            raise LoginError(f"the backend connection's start failed earlier: {self._error}")

    def _fail(self, exc: Exception) -> Exception:
        if self._error is None:
            self._error = exc
        return exc


class SSLNegotiation(_Failed):
    """The client side of SSLRequest: send :meth:`request`, feed the backend's answer to
    :meth:`receive_data`. True: start TLS now (nothing of the backend's is buffered: a byte
    after the ``S`` would have travelled in plaintext ahead of the TLS handshake, the
    CVE-2021-23222 class, and is refused); False: the backend refused TLS and ``allow_plain``
    lets the connection go on in plaintext. Anything else raises ProtocolError."""

    def __init__(self, *, allow_plain: bool) -> None:
        self._allow_plain = allow_plain
        self._answered = False

    def request(self) -> bytes:
        self._check()
        return build_ssl_request()

    def receive_data(self, data: bytes | bytearray) -> bool:
        """The backend's answer: at least one byte (b"": it hung up)."""
        self._check()
        data = bytes(data)
        if self._answered:
            raise self._fail(ProtocolError("the SSLRequest was answered already"))
        if not data:
            raise self._fail(ProtocolError("backend closed the connection during TLS negotiation"))
        self._answered = True
        answer, rest = data[:1], data[1:]
        if answer not in (b"S", b"N"):
            raise self._fail(ProtocolError(f"backend answered SSLRequest with {answer!r}"))
        if rest:
            raise self._fail(
                ProtocolError(
                    f"backend sent {len(rest)} bytes after its answer {answer!r} to SSLRequest "
                    "(data ahead of the TLS handshake is refused)"
                )
            )
        if answer == b"N" and not self._allow_plain:
            raise self._fail(ProtocolError("backend refused TLS"))
        return answer == b"S"


@attrs.frozen
class SendBytes:
    """Send these bytes to the backend, then ask again."""

    data: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


@attrs.frozen
class NeedData:
    """Read from the backend and :meth:`BackendStartup.receive_data` what came."""


@attrs.frozen
class DeriveKey:
    """Call :meth:`BackendStartup.derive_key` (PBKDF2, ~1 ms, releases the GIL: a worker
    thread), then ask again."""


@attrs.define(eq=False)
class BackendSessionStart:
    """What the backend said between AuthenticationOk and ReadyForQuery, to forward verbatim."""

    raw: bytes  # notices, ParameterStatus, BackendKeyData ... ReadyForQuery, verbatim
    key: BackendKeyData | None
    negotiate: NegotiateProtocolVersion | None
    parameters: dict[str, str]
    leftover: bytes  # bytes the backend sent after ReadyForQuery (forward before relaying)
    method: str | None
    #: The transaction status of the ReadyForQuery that ended the start (b"I").
    status: bytes = b"I"


@attrs.frozen
class Started:
    """ReadyForQuery came: the session is ready for its first query."""

    start: BackendSessionStart


StartupEvent = SendBytes | NeedData | DeriveKey | Started


class _Phase(enum.Enum):
    SEND_STARTUP = "sending the startup message"
    AUTHENTICATING = "authenticating"
    DERIVING = "deriving the SCRAM key"
    SESSION_START = "reading the session start"
    STARTED = "started"


class BackendStartup(_Failed):
    """One backend login: the StartupMessage for ``parameters`` (``user`` and ``database``
    among them) at ``protocol``, the authentication ``login`` runs, and the session start up
    to ReadyForQuery."""

    def __init__(
        self,
        login: UpstreamLogin,
        parameters: Mapping[str, str],
        protocol: tuple[int, int] = (3, 0),
        *,
        max_message_size: int = STARTUP_MAX_MESSAGE_SIZE,
        max_total: int = STARTUP_MAX_TOTAL,
    ) -> None:
        self._login = login
        self._startup = build_startup_message(parameters, protocol=protocol)
        self._reader = MessageReader(max_message_size)
        self._max_total = max_total
        self._received = 0
        self._phase = _Phase.SEND_STARTUP
        self._pending: Message | None = None
        self._outgoing = b""
        self._raw = bytearray()
        self._key: BackendKeyData | None = None
        self._params: dict[str, str] = {}
        self._started: Started | None = None

    @property
    def authenticated(self) -> bool:
        """AuthenticationOk came (the session start is being read, or is over)."""
        return self._login.authenticated

    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes the backend sent (b"": it hung up, which ends the start with an error)."""
        self._check()
        if self._phase is _Phase.STARTED:
            raise self._fail(LoginError("the backend's start is over; the relay reads on"))
        if not data:
            raise self._fail(
                LoginError(
                    "backend closed the connection "
                    + ("before ReadyForQuery" if self.authenticated else "during login")
                )
            )
        self._received += len(data)
        if self._received > self._max_total:
            raise self._fail(
                ProtocolError(
                    f"backend sent more than {self._max_total} bytes before ReadyForQuery"
                )
            )
        self._reader.feed(data)

    def derive_key(self) -> None:
        """Handle the message :class:`DeriveKey` was about (runs PBKDF2)."""
        self._check()
        if self._phase is not _Phase.DERIVING or self._pending is None:
            raise self._fail(LoginError("derive_key called while no key is to be derived"))
        msg, self._pending = self._pending, None
        self._phase = _Phase.AUTHENTICATING
        try:
            self._outgoing = self._step(msg)
        except (LoginError, BackendError, ProtocolError) as exc:
            raise self._fail(exc) from None

    def next_event(self) -> StartupEvent:
        self._check()
        try:
            return self._next()
        except (LoginError, BackendError, ProtocolError) as exc:
            raise self._fail(exc) from None

    def _next(self) -> StartupEvent:
        if self._phase is _Phase.SEND_STARTUP:
            self._phase = _Phase.AUTHENTICATING
            return SendBytes(self._startup)
        if self._outgoing:
            data, self._outgoing = self._outgoing, b""
            return SendBytes(data)
        if self._phase is _Phase.DERIVING:
            return DeriveKey()
        if self._started is not None:
            return self._started
        while True:
            msg = self._next_message()
            if msg is None:
                return NeedData()
            if self._phase is _Phase.AUTHENTICATING:
                if self._login.will_derive_key(msg):
                    self._pending = msg
                    self._phase = _Phase.DERIVING
                    return DeriveKey()
                data = self._step(msg)
                if data:
                    return SendBytes(data)
            elif self._session_start(msg):
                assert self._started is not None
                return self._started

    def _next_message(self) -> Message | None:
        try:
            return self._reader.next_message()
        except ProtocolError as exc:
            raise ProtocolError(f"backend login: {exc}") from None

    def _step(self, msg: Message) -> bytes:
        """One authentication message; the bytes to send (b"": none)."""
        step = self._login.receive_message(msg)
        if isinstance(step, Authenticated):
            self._phase = _Phase.SESSION_START
            for notice in self._login.notices:
                self._raw += notice.encode()
        return step.data if isinstance(step, Send) else b""

    def _session_start(self, msg: Message) -> bool:
        """One message between AuthenticationOk and ReadyForQuery; True once it is over."""
        parsed = parse_backend_message(msg)
        if isinstance(parsed, ErrorResponse):
            raise BackendError(parsed.fields)
        if isinstance(parsed, BackendKeyData):
            if self._key is not None:
                raise LoginError("backend sent BackendKeyData twice")
            self._key = parsed
        elif isinstance(parsed, ParameterStatus):
            self._params[parsed.name] = parsed.value
        elif not isinstance(parsed, NoticeResponse | ReadyForQuery):
            raise LoginError(
                f"backend sent {type(parsed).__name__} after AuthenticationOk, before ReadyForQuery"
            )
        self._raw += msg.raw
        if not isinstance(parsed, ReadyForQuery):
            return False
        self._phase = _Phase.STARTED
        self._started = Started(
            BackendSessionStart(
                raw=bytes(self._raw),
                key=self._key,
                negotiate=self._login.negotiate,
                parameters=self._params,
                leftover=self._reader.take_buffered(),
                method=self._login.method,
                status=parsed.status,
            )
        )
        return True
