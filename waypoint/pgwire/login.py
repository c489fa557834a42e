"""Client side of backend authentication, sans-IO.

The caller sends the StartupMessage itself (``build_startup_message``), then
feeds each backend message to :meth:`UpstreamLogin.receive_message` and acts
on the step it returns::

    sock.sendall(build_startup_message({"user": role, "database": db}))
    login = UpstreamLogin(role, password)
    while True:
        msg = reader.next_message()
        if msg is None:
            reader.feed(sock.recv(65536))   # (EOF: the backend hung up)
            continue
        step = login.receive_message(msg)
        if isinstance(step, Send):
            sock.sendall(step.data)
        elif isinstance(step, Authenticated):
            break       # ParameterStatus / BackendKeyData / ReadyForQuery follow

A backend ErrorResponse raises :class:`BackendError` (forward its fields to
the client); anything the backend does wrong raises :class:`LoginError`.

Methods: trust, cleartext password, MD5, SCRAM-SHA-256 and
SCRAM-SHA-256-PLUS (``tls-server-end-point``).  SCRAM runs one of two ways:
with :class:`ScramKeys` kept from when the verifier was made (no PBKDF2; used
when the server's salt and iteration count match the keys), or from the
password through scramp's ``ScramClient`` (one PBKDF2).  Both verify the
server signature through :func:`scram.verify_server_final`.

Handling the AuthenticationSASLContinue message may run PBKDF2 (~1 ms, it
releases the GIL): :meth:`UpstreamLogin.will_derive_key` tells the caller
when to hand that one call to a worker thread.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

import attrs
from scramp import ScramClient, ScramException

from . import scram
from .errors import BackendError, LoginError, ProtocolError
from .framing import Message
from .messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendMessage,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    PasswordMessage,
    SASLInitialResponse,
    SASLResponse,
    parse_backend_message,
)
from .scram import ScramKeys, make_md5_verifier, make_scram_verifier, tls_server_end_point_hash

__all__ = [
    "Authenticated",
    "BackendError",
    "Continue",
    "LoginError",
    "LoginStep",
    "ScramKeys",
    "Send",
    "UpstreamLogin",
    "make_md5_verifier",
    "make_scram_verifier",
    "tls_server_end_point_hash",
]

SCRAM: Final = "SCRAM-SHA-256"
SCRAM_PLUS: Final = "SCRAM-SHA-256-PLUS"


@attrs.frozen
class Send:
    """Send these bytes to the backend, then feed the next message."""

    data: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


@attrs.frozen
class Continue:
    """Nothing to send; feed the next message."""


@attrs.frozen
class Authenticated:
    """AuthenticationOk received and every check passed."""


LoginStep = Send | Continue | Authenticated


class _State(enum.Enum):
    AWAIT_REQUEST = "waiting for an authentication request"
    AWAIT_SASL_CONTINUE = "waiting for AuthenticationSASLContinue"
    AWAIT_SASL_FINAL = "waiting for AuthenticationSASLFinal"
    AWAIT_OK_AFTER_SASL = "waiting for AuthenticationOk after SASLFinal"
    AWAIT_OK_AFTER_PASSWORD = "waiting for AuthenticationOk after the password"
    AUTHENTICATED = "authenticated"


_Handler = Callable[["UpstreamLogin", BackendMessage], LoginStep]


class UpstreamLogin:
    """Authenticate to a PostgreSQL backend as ``user``.

    ``tls_server_end_point`` is the RFC 5929 hash of the backend certificate
    (see :func:`tls_server_end_point_hash`); given, SCRAM-SHA-256-PLUS is used
    when offered.  ``channel_binding_required`` refuses every login that is
    not SCRAM-SHA-256-PLUS (as libpq's ``channel_binding=require``);
    ``scram_required`` refuses every login that is not SCRAM (no cleartext or
    MD5 password, no trust) but lets SCRAM run unbound: for a TLS link whose
    server certificate is verified but cannot be bound.
    """

    def __init__(
        self,
        user: str,
        password: str | None = None,
        *,
        scram_keys: ScramKeys | None = None,
        tls_server_end_point: bytes | None = None,
        channel_binding_required: bool = False,
        scram_required: bool = False,
    ) -> None:
        if tls_server_end_point is not None and not tls_server_end_point:
            raise ValueError("tls_server_end_point cannot be empty")
        self._user = user
        self._password = password
        self._keys = scram_keys
        self._cb_data = tls_server_end_point
        self._cb_required = channel_binding_required
        self._scram_required = scram_required or channel_binding_required
        self._state = _State.AWAIT_REQUEST
        self.negotiate: NegotiateProtocolVersion | None = None
        self.notices: list[NoticeResponse] = []
        #: "trust", "password", "md5", "SCRAM-SHA-256" or "SCRAM-SHA-256-PLUS"
        self.method: str | None = None
        #: True when SCRAM ran from ScramKeys, with no PBKDF2.
        self.used_precomputed_keys = False
        # SCRAM exchange state
        self._scramp: ScramClient | None = None
        self._nonce = ""
        self._gs2 = ""
        self._first_bare = ""
        self._expected_signature = b""

    def __repr__(self) -> str:
        return f"<UpstreamLogin user={self._user!r} state={self._state.name} method={self.method}>"

    @property
    def authenticated(self) -> bool:
        return self._state is _State.AUTHENTICATED

    # -------------------------------------------------------------- driving

    def receive_message(self, msg: Message) -> LoginStep:
        """Feed one backend message; returns what to do next."""
        parsed = parse_backend_message(msg)
        if isinstance(parsed, ErrorResponse):
            raise BackendError(parsed.fields)
        if self._state is _State.AUTHENTICATED:
            raise LoginError(
                f"login is complete; {type(parsed).__name__} belongs to the session start"
            )
        if isinstance(parsed, NoticeResponse):
            self.notices.append(parsed)
            return Continue()
        handler = _TRANSITIONS.get((self._state, type(parsed)))
        if handler is None:
            raise LoginError(f"backend sent {type(parsed).__name__} while {self._state.value}")
        return handler(self, parsed)

    def will_derive_key(self, msg: Message) -> bool:
        """Whether ``receive_message(msg)`` would run PBKDF2 (run it in a
        worker thread then).  Never raises: a bad message answers False and
        the error comes from ``receive_message``."""
        if self._state is not _State.AWAIT_SASL_CONTINUE or msg.type != b"R":
            return False
        if self._scramp is not None:
            return True
        try:
            parsed = parse_backend_message(msg)
            if not isinstance(parsed, AuthenticationSASLContinue):
                return False
            first = scram.parse_server_first(parsed.data, self._nonce)
        except ProtocolError:
            return False
        return not self._keys_match(first) and self._password is not None

    # ------------------------------------------------------------- handlers

    def _on_negotiate(self, msg: BackendMessage) -> LoginStep:
        assert isinstance(msg, NegotiateProtocolVersion)
        if self.negotiate is not None:
            raise LoginError("backend sent NegotiateProtocolVersion twice")
        self.negotiate = msg
        return Continue()

    def _require_no_binding(self, method: str) -> None:
        if self._cb_required:
            raise LoginError(
                f"channel binding is required, but the backend asked for {method} authentication"
            )
        if self._scram_required:
            raise LoginError(
                f"SCRAM is required over this TLS link, but the backend asked for {method} "
                "authentication"
            )

    def _on_trust(self, msg: BackendMessage) -> LoginStep:
        self._require_no_binding("no")
        self.method = "trust"
        self._state = _State.AUTHENTICATED
        return Authenticated()

    def _need_password(self, method: str) -> str:
        if self._password is None:
            raise LoginError(
                f"backend asked for {method} authentication, but no password is available"
            )
        return self._password

    def _on_cleartext(self, msg: BackendMessage) -> LoginStep:
        self._require_no_binding("cleartext password")
        password = self._need_password("cleartext password")
        self.method = "password"
        self._state = _State.AWAIT_OK_AFTER_PASSWORD
        return Send(PasswordMessage(password).encode())

    def _on_md5(self, msg: BackendMessage) -> LoginStep:
        assert isinstance(msg, AuthenticationMD5Password)
        self._require_no_binding("MD5 password")
        password = self._need_password("MD5 password")
        self.method = "md5"
        self._state = _State.AWAIT_OK_AFTER_PASSWORD
        return Send(PasswordMessage(scram.md5_response(password, self._user, msg.salt)).encode())

    def _on_other(self, msg: BackendMessage) -> LoginStep:
        assert isinstance(msg, AuthenticationOther)
        raise LoginError(
            f"backend asked for unsupported authentication method {msg.method_name} "
            f"(code {msg.code})"
        )

    def _on_sasl(self, msg: BackendMessage) -> LoginStep:
        assert isinstance(msg, AuthenticationSASL)
        offered = msg.mechanisms
        if self._cb_data is not None and SCRAM_PLUS in offered:
            mechanism = SCRAM_PLUS
        elif self._cb_required:
            reason = (
                "the backend did not offer SCRAM-SHA-256-PLUS"
                if self._cb_data is not None
                else "no TLS certificate hash is available for it"
            )
            raise LoginError(f"channel binding is required, but {reason}")
        elif SCRAM in offered:
            mechanism = SCRAM
        else:
            raise LoginError(
                f"backend offered no supported SASL mechanism: {', '.join(offered)[:200]}"
            )
        use_binding = mechanism == SCRAM_PLUS
        if self._keys is None and self._password is None:
            raise LoginError(f"backend asked for {mechanism}, but no password is available")
        self.method = mechanism
        if self._keys is not None:
            self._nonce = scram.new_client_nonce()
            self._gs2 = scram.gs2_header(self._cb_data, use_binding)
            self._first_bare = scram.client_first_bare(self._user, self._nonce)
            client_first = self._gs2 + self._first_bare
        else:
            assert self._password is not None
            binding = None if self._cb_data is None else ("tls-server-end-point", self._cb_data)
            try:
                self._scramp = ScramClient([mechanism], self._user, self._password, binding)
                client_first = self._scramp.get_client_first()
                self._nonce = str(self._scramp.c_nonce)
            except ScramException as exc:
                raise LoginError(f"cannot start {mechanism}: {exc.args[0]}") from None
        self._state = _State.AWAIT_SASL_CONTINUE
        return Send(SASLInitialResponse(mechanism, client_first.encode("utf-8")).encode())

    def _keys_match(self, first: scram.ServerFirst) -> bool:
        keys = self._keys
        return keys is not None and keys.salt == first.salt and keys.iterations == first.iterations

    def _on_sasl_continue(self, msg: BackendMessage) -> LoginStep:
        assert isinstance(msg, AuthenticationSASLContinue)
        # Checked here for both ways, so that both refuse the same servers.
        first = scram.parse_server_first(msg.data, self._nonce)
        if self._scramp is not None:
            try:
                self._scramp.set_server_first(first.message)
                final = self._scramp.get_client_final()
            except ScramException as exc:
                raise LoginError(f"SCRAM exchange failed: {exc.args[0]}") from None
            self._expected_signature = bytes(self._scramp.server_signature)
        else:
            if self._keys_match(first):
                assert self._keys is not None
                salted = self._keys.salted_password
                self.used_precomputed_keys = True
            elif self._password is not None:
                salted = scram.derive_salted_password(self._password, first.salt, first.iterations)
            else:
                raise LoginError(
                    "backend's SCRAM salt or iteration count differs from the verifier's "
                    "keys, and no password is available"
                )
            without_proof = scram.client_final_without_proof(self._gs2, self._cb_data, first.nonce)
            auth_message = f"{self._first_bare},{first.message},{without_proof}".encode()
            proof, self._expected_signature = scram.client_proof_and_server_signature(
                salted, auth_message
            )
            final = scram.client_final(without_proof, proof)
        self._state = _State.AWAIT_SASL_FINAL
        return Send(SASLResponse(final.encode("ascii")).encode())

    def _on_sasl_final(self, msg: BackendMessage) -> LoginStep:
        assert isinstance(msg, AuthenticationSASLFinal)
        scram.verify_server_final(msg.data, self._expected_signature)
        self._state = _State.AWAIT_OK_AFTER_SASL
        return Continue()

    def _on_ok_without_final(self, msg: BackendMessage) -> LoginStep:
        raise LoginError(
            "backend sent AuthenticationOk without SASLFinal: its identity was never proven"
        )

    def _on_ok(self, msg: BackendMessage) -> LoginStep:
        self._state = _State.AUTHENTICATED
        return Authenticated()


# (state, message class) → handler.  A pair not listed is an illegal transition.
_TRANSITIONS: Final[dict[tuple[_State, type], _Handler]] = {
    (_State.AWAIT_REQUEST, NegotiateProtocolVersion): UpstreamLogin._on_negotiate,
    (_State.AWAIT_REQUEST, AuthenticationOk): UpstreamLogin._on_trust,
    (_State.AWAIT_REQUEST, AuthenticationCleartextPassword): UpstreamLogin._on_cleartext,
    (_State.AWAIT_REQUEST, AuthenticationMD5Password): UpstreamLogin._on_md5,
    (_State.AWAIT_REQUEST, AuthenticationSASL): UpstreamLogin._on_sasl,
    (_State.AWAIT_REQUEST, AuthenticationOther): UpstreamLogin._on_other,
    (_State.AWAIT_SASL_CONTINUE, AuthenticationSASLContinue): UpstreamLogin._on_sasl_continue,
    (_State.AWAIT_SASL_FINAL, AuthenticationSASLFinal): UpstreamLogin._on_sasl_final,
    (_State.AWAIT_SASL_FINAL, AuthenticationOk): UpstreamLogin._on_ok_without_final,
    (_State.AWAIT_SASL_CONTINUE, AuthenticationOk): UpstreamLogin._on_ok_without_final,
    (_State.AWAIT_OK_AFTER_SASL, AuthenticationOk): UpstreamLogin._on_ok,
    (_State.AWAIT_OK_AFTER_PASSWORD, AuthenticationOk): UpstreamLogin._on_ok,
}
