"""UpstreamLogin against scripted backends: trust, cleartext, MD5, SCRAM
(scramp's ScramServer plays the backend) and SCRAM-SHA-256-PLUS."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest
import trustme
from scramp import ScramMechanism

from waypoint.pgwire import (
    Authenticated,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendError,
    Continue,
    LoginError,
    Message,
    MessageReader,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    ProtocolError,
    ScramKeys,
    Send,
    UpstreamLogin,
    build_error_response,
    make_md5_verifier,
    make_scram_verifier,
    parse_password_message,
    parse_sasl_initial_response,
    parse_sasl_response,
    tls_server_end_point_hash,
)

USER = "wp_alice"
PASSWORD = "correct horse battery staple"


def _messages(data: bytes) -> list[Message]:
    reader = MessageReader()
    reader.feed(data)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    assert reader.buffered == 0
    return out


def _feed(login: UpstreamLogin, *encoded: bytes) -> list[object]:
    steps: list[object] = []
    for data in encoded:
        for msg in _messages(data):
            steps.append(login.receive_message(msg))
    return steps


def _only_send(step: object) -> Message:
    assert isinstance(step, Send)
    (msg,) = _messages(step.data)
    return msg


# --------------------------------------------------------------- simple ones


def test_trust_authenticates_on_authentication_ok() -> None:
    login = UpstreamLogin(USER)
    assert _feed(login, AuthenticationOk().encode()) == [Authenticated()]
    assert login.authenticated and login.method == "trust"


def test_cleartext_sends_password_then_authenticates() -> None:
    login = UpstreamLogin(USER, PASSWORD)
    (step,) = _feed(login, AuthenticationCleartextPassword().encode())
    assert parse_password_message(_only_send(step)).password == PASSWORD
    assert _feed(login, AuthenticationOk().encode()) == [Authenticated()]
    assert login.method == "password"


def test_md5_response_matches_postgres_formula() -> None:
    salt = b"\x01\x02\x03\x04"
    login = UpstreamLogin(USER, PASSWORD)
    (step,) = _feed(login, AuthenticationMD5Password(salt).encode())
    inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert parse_password_message(_only_send(step)).password == expected
    assert _feed(login, AuthenticationOk().encode()) == [Authenticated()]
    assert login.method == "md5"


def test_md5_verifier_is_md5_of_secret_and_role() -> None:
    assert make_md5_verifier("s3cret", "bob") == "md5" + hashlib.md5(b"s3cretbob").hexdigest()


@pytest.mark.parametrize(
    "request_message",
    [AuthenticationCleartextPassword().encode(), AuthenticationMD5Password(b"abcd").encode()],
)
def test_password_method_without_password_is_login_error(request_message: bytes) -> None:
    login = UpstreamLogin(USER)
    with pytest.raises(LoginError, match="no password is available"):
        _feed(login, request_message)


def test_sasl_without_password_or_keys_is_login_error() -> None:
    with pytest.raises(LoginError, match="no password is available"):
        _feed(UpstreamLogin(USER), AuthenticationSASL(("SCRAM-SHA-256",)).encode())


def test_unsupported_method_is_named_in_login_error() -> None:
    with pytest.raises(LoginError, match=r"GSSAPI \(code 7\)"):
        _feed(UpstreamLogin(USER, PASSWORD), AuthenticationOther(7).encode())


def test_unknown_sasl_mechanism_is_login_error() -> None:
    with pytest.raises(LoginError, match="no supported SASL mechanism: OAUTHBEARER"):
        _feed(UpstreamLogin(USER, PASSWORD), AuthenticationSASL(("OAUTHBEARER",)).encode())


def test_backend_error_response_raises_backend_error_with_all_fields() -> None:
    error = build_error_response(
        "FATAL", "3D000", 'database "nope" does not exist', detail="d", hint="h"
    )
    login = UpstreamLogin(USER, PASSWORD)
    with pytest.raises(BackendError) as info:
        _feed(login, error)
    assert info.value.sqlstate == "3D000"
    assert dict(info.value.fields) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "3D000",
        "M": 'database "nope" does not exist',
        "D": "d",
        "H": "h",
    }
    assert isinstance(info.value, ProtocolError)


def test_negotiate_protocol_version_before_auth_is_recorded() -> None:
    login = UpstreamLogin(USER)
    npv = NegotiateProtocolVersion(0, ("_pq_.x",))
    assert _feed(login, npv.encode(), AuthenticationOk().encode()) == [
        Continue(),
        Authenticated(),
    ]
    assert login.negotiate == npv


def test_second_negotiate_protocol_version_is_login_error() -> None:
    npv = NegotiateProtocolVersion(0).encode()
    with pytest.raises(LoginError, match="twice"):
        _feed(UpstreamLogin(USER), npv, npv)


def test_negotiate_after_auth_request_is_login_error() -> None:
    login = UpstreamLogin(USER, PASSWORD)
    _feed(login, AuthenticationCleartextPassword().encode())
    with pytest.raises(LoginError, match="NegotiateProtocolVersion while waiting for"):
        _feed(login, NegotiateProtocolVersion(0).encode())


def test_notice_during_login_is_kept_and_login_continues() -> None:
    login = UpstreamLogin(USER)
    notice = NoticeResponse({"S": "WARNING", "C": "01000", "M": "hi"})
    assert _feed(login, notice.encode(), AuthenticationOk().encode()) == [
        Continue(),
        Authenticated(),
    ]
    assert login.notices == [notice]


def test_message_after_authenticated_is_login_error() -> None:
    login = UpstreamLogin(USER)
    _feed(login, AuthenticationOk().encode())
    with pytest.raises(LoginError, match="login is complete"):
        _feed(login, ParameterStatus("a", "b").encode())


def test_session_message_during_login_is_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unexpected backend message type b'D'"):
        UpstreamLogin(USER).receive_message(Message(b"D", b"\x00\x00"))


@pytest.mark.parametrize(
    "request_message",
    [
        AuthenticationOk().encode(),
        AuthenticationCleartextPassword().encode(),
        AuthenticationMD5Password(b"abcd").encode(),
    ],
)
def test_channel_binding_required_refuses_non_scram_methods(request_message: bytes) -> None:
    login = UpstreamLogin(
        USER, PASSWORD, tls_server_end_point=b"\x01" * 32, channel_binding_required=True
    )
    with pytest.raises(LoginError, match="channel binding is required"):
        _feed(login, request_message)


def test_channel_binding_required_refuses_scram_without_plus() -> None:
    login = UpstreamLogin(
        USER, PASSWORD, tls_server_end_point=b"\x01" * 32, channel_binding_required=True
    )
    with pytest.raises(LoginError, match="did not offer SCRAM-SHA-256-PLUS"):
        _feed(login, AuthenticationSASL(("SCRAM-SHA-256",)).encode())


def test_channel_binding_required_without_certificate_hash_is_login_error() -> None:
    login = UpstreamLogin(USER, PASSWORD, channel_binding_required=True)
    with pytest.raises(LoginError, match="no TLS certificate hash"):
        _feed(login, AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode())


@pytest.mark.parametrize(
    "request_message",
    [
        AuthenticationOk().encode(),
        AuthenticationCleartextPassword().encode(),
        AuthenticationMD5Password(b"abcd").encode(),
    ],
)
def test_scram_required_refuses_every_other_method(request_message: bytes) -> None:
    """A verified TLS link whose certificate cannot be bound: still no password leaves."""
    login = UpstreamLogin(USER, PASSWORD, scram_required=True)
    with pytest.raises(LoginError, match="SCRAM is required over this TLS link"):
        _feed(login, request_message)
    assert login.method is None


def test_scram_required_runs_scram_unbound(verifier_and_keys: tuple[str, ScramKeys]) -> None:
    verifier, keys = verifier_and_keys
    backend = ScramBackend(
        _auth_info_from_verifier(verifier), mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    )
    login = UpstreamLogin(USER, PASSWORD, scram_keys=keys, scram_required=True)
    backend.run(login)
    assert backend.chosen == "SCRAM-SHA-256"
    assert backend.client_first.startswith(b"n,,")  # no binding data: the honest "n" flag
    assert login.authenticated


def test_send_step_repr_hides_the_password() -> None:
    login = UpstreamLogin(USER, PASSWORD)
    (step,) = _feed(login, AuthenticationCleartextPassword().encode())
    assert PASSWORD not in repr(step)
    assert PASSWORD not in repr(login)


# ----------------------------------------------------------------- SCRAM


AuthInfo = tuple[bytes, bytes, bytes, int]
Tamper = Callable[[bytes], bytes]


def _auth_info_from_verifier(verifier: str) -> AuthInfo:
    """Parse PostgreSQL's stored SCRAM form back into scramp's auth_info."""
    mech, rest = verifier.split("$", 1)
    assert mech == "SCRAM-SHA-256"
    iter_salt, keys = rest.split("$")
    iterations, salt_b64 = iter_salt.split(":")
    stored_b64, server_b64 = keys.split(":")
    b64 = base64.b64decode
    return b64(salt_b64), b64(stored_b64), b64(server_b64), int(iterations)


class ScramBackend:
    """A scripted backend whose SCRAM side is scramp's ScramServer."""

    def __init__(
        self,
        auth_info: AuthInfo,
        *,
        mechanisms: tuple[str, ...] = ("SCRAM-SHA-256",),
        cb_data: bytes | None = None,
        tamper_first: Tamper | None = None,
        tamper_final: Tamper | None = None,
        skip_final: bool = False,
    ) -> None:
        self.auth_info = auth_info
        self.mechanisms = mechanisms
        self.cb_data = cb_data
        self.tamper_first = tamper_first
        self.tamper_final = tamper_final
        self.skip_final = skip_final
        self.chosen: str | None = None
        self.client_first: bytes = b""

    def run(self, login: UpstreamLogin) -> None:
        step = login.receive_message(_messages(AuthenticationSASL(self.mechanisms).encode())[0])
        initial = parse_sasl_initial_response(_only_send(step))
        assert initial.data is not None
        self.chosen = initial.mechanism
        self.client_first = initial.data
        binding = None if self.cb_data is None else ("tls-server-end-point", self.cb_data)
        server = ScramMechanism(initial.mechanism).make_server(
            lambda _user: self.auth_info, channel_binding=binding
        )
        server.set_client_first(initial.data.decode())
        first = server.get_server_first().encode()
        if self.tamper_first is not None:
            first = self.tamper_first(first)
        step = login.receive_message(_messages(AuthenticationSASLContinue(first).encode())[0])
        response = parse_sasl_response(_only_send(step))
        server.set_client_final(response.data.decode())
        final = server.get_server_final().encode()
        if self.tamper_final is not None:
            final = self.tamper_final(final)
        if not self.skip_final:
            assert (
                login.receive_message(_messages(AuthenticationSASLFinal(final).encode())[0])
                == Continue()
            )
        assert login.receive_message(_messages(AuthenticationOk().encode())[0]) == Authenticated()


@pytest.fixture(scope="module")
def verifier_and_keys() -> tuple[str, ScramKeys]:
    return make_scram_verifier(PASSWORD)


def test_scram_with_password_uses_scramp_client(verifier_and_keys: tuple[str, ScramKeys]) -> None:
    verifier, _keys = verifier_and_keys
    login = UpstreamLogin(USER, PASSWORD)
    ScramBackend(_auth_info_from_verifier(verifier)).run(login)
    assert login.authenticated and login.method == "SCRAM-SHA-256"
    assert not login.used_precomputed_keys


def test_scram_with_keys_needs_no_password(verifier_and_keys: tuple[str, ScramKeys]) -> None:
    verifier, keys = verifier_and_keys
    login = UpstreamLogin(USER, scram_keys=keys)
    ScramBackend(_auth_info_from_verifier(verifier)).run(login)
    assert login.authenticated and login.used_precomputed_keys


def test_verifier_matches_scramp_make_auth_info() -> None:
    salt = b"0123456789abcdef"
    verifier, keys = make_scram_verifier(PASSWORD, iterations=4096, salt=salt)
    expected = ScramMechanism().make_auth_info(PASSWORD, iteration_count=4096, salt=salt)
    assert _auth_info_from_verifier(verifier) == expected
    assert keys.salt == salt and keys.iterations == 4096
    assert keys.salted_password == hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), salt, 4096)
    assert "salted_password" not in repr(keys)


def test_scram_keys_with_other_salt_fall_back_to_password() -> None:
    verifier, _ = make_scram_verifier(PASSWORD, salt=b"server-salt-0001")
    _, stale_keys = make_scram_verifier(PASSWORD, salt=b"other-salt-00001")
    login = UpstreamLogin(USER, PASSWORD, scram_keys=stale_keys)
    backend = ScramBackend(_auth_info_from_verifier(verifier))
    backend.run(login)
    assert login.authenticated and not login.used_precomputed_keys


def test_scram_keys_with_other_iterations_and_no_password_is_login_error() -> None:
    verifier, _ = make_scram_verifier(PASSWORD, salt=b"sixteen-byte-slt", iterations=5000)
    _, keys = make_scram_verifier(PASSWORD, salt=b"sixteen-byte-slt", iterations=4096)
    login = UpstreamLogin(USER, scram_keys=keys)
    with pytest.raises(LoginError, match="differs from the verifier's keys"):
        ScramBackend(_auth_info_from_verifier(verifier)).run(login)


def test_will_derive_key_only_when_pbkdf2_runs(verifier_and_keys: tuple[str, ScramKeys]) -> None:
    verifier, keys = verifier_and_keys
    info = _auth_info_from_verifier(verifier)
    server = ScramMechanism().make_server(lambda _u: info)
    for login, expected in (
        (UpstreamLogin(USER, scram_keys=keys), False),
        (UpstreamLogin(USER, PASSWORD), True),
    ):
        step = login.receive_message(_messages(AuthenticationSASL(("SCRAM-SHA-256",)).encode())[0])
        initial = parse_sasl_initial_response(_only_send(step))
        assert initial.data is not None
        server = ScramMechanism().make_server(lambda _u: info)
        server.set_client_first(initial.data.decode())
        cont = _messages(AuthenticationSASLContinue(server.get_server_first().encode()).encode())[0]
        assert login.will_derive_key(cont) is expected
    assert UpstreamLogin(USER, PASSWORD).will_derive_key(cont) is False


def test_wrong_password_is_refused_by_the_server(verifier_and_keys: tuple[str, ScramKeys]) -> None:
    verifier, _ = verifier_and_keys
    login = UpstreamLogin(USER, "wrong password")
    with pytest.raises(Exception, match="client keys don't match"):
        ScramBackend(_auth_info_from_verifier(verifier)).run(login)


def _wrong_signature(final: bytes) -> bytes:
    sig = bytearray(base64.b64decode(final[2:]))
    sig[0] ^= 0x01
    return b"v=" + base64.b64encode(bytes(sig))


@pytest.mark.parametrize("way", ["password", "keys"])
def test_wrong_server_signature_is_login_error(
    way: str, verifier_and_keys: tuple[str, ScramKeys]
) -> None:
    verifier, keys = verifier_and_keys
    login = (
        UpstreamLogin(USER, PASSWORD) if way == "password" else UpstreamLogin(USER, scram_keys=keys)
    )
    backend = ScramBackend(_auth_info_from_verifier(verifier), tamper_final=_wrong_signature)
    with pytest.raises(LoginError, match="server signature is wrong"):
        backend.run(login)
    assert not login.authenticated


@pytest.mark.parametrize("way", ["password", "keys"])
def test_server_skipping_sasl_final_is_login_error(
    way: str, verifier_and_keys: tuple[str, ScramKeys]
) -> None:
    verifier, keys = verifier_and_keys
    login = (
        UpstreamLogin(USER, PASSWORD) if way == "password" else UpstreamLogin(USER, scram_keys=keys)
    )
    backend = ScramBackend(_auth_info_from_verifier(verifier), skip_final=True)
    with pytest.raises(LoginError, match="AuthenticationOk without SASLFinal"):
        backend.run(login)


def test_authentication_ok_right_after_sasl_start_is_login_error() -> None:
    login = UpstreamLogin(USER, PASSWORD)
    _feed(login, AuthenticationSASL(("SCRAM-SHA-256",)).encode())
    with pytest.raises(LoginError, match="AuthenticationOk without SASLFinal"):
        _feed(login, AuthenticationOk().encode())


def _replace_nonce(first: bytes) -> bytes:
    attrs_ = dict(part.split(b"=", 1) for part in first.split(b","))
    attrs_[b"r"] = b"attackernonce" + attrs_[b"r"][-8:]
    return b",".join(k + b"=" + v for k, v in attrs_.items())


def _set_iterations(count: int) -> Tamper:
    def tamper(first: bytes) -> bytes:
        head, _ = first.rsplit(b",i=", 1)
        return head + b",i=" + str(count).encode()

    return tamper


@pytest.mark.parametrize("way", ["password", "keys"])
@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_replace_nonce, "server nonce does not extend the client nonce"),
        (_set_iterations(4095), "iteration count 4095 is below the minimum of 4096"),
        (_set_iterations(20_000_000), "above the maximum"),
        (lambda first: first + b",x=ext", "expected exactly r=,s=,i="),
        (lambda first: first.replace(b"s=", b"s=!!"), "invalid base64"),
        (lambda first: first.replace(b",i=", b",i=-"), "invalid iteration count"),
        (lambda _first: b"garbage", "expected exactly r=,s=,i="),
        (lambda _first: b"e=other-error", "server reported an error: other-error"),
        (lambda _first: b"r=\xff", "not ASCII"),
    ],
)
def test_malformed_server_first_is_login_error(
    way: str, tamper: Tamper, message: str, verifier_and_keys: tuple[str, ScramKeys]
) -> None:
    verifier, keys = verifier_and_keys
    login = (
        UpstreamLogin(USER, PASSWORD) if way == "password" else UpstreamLogin(USER, scram_keys=keys)
    )
    backend = ScramBackend(_auth_info_from_verifier(verifier), tamper_first=tamper)
    with pytest.raises(LoginError, match=message):
        backend.run(login)


@pytest.mark.parametrize(
    ("final", "message"),
    [
        (b"e=invalid-proof", "server reported an error: invalid-proof"),
        (b"x=abc", "expected exactly v="),
        (b"v=!!!", "invalid base64"),
        (b"\xff", "not ASCII"),
    ],
)
def test_malformed_server_final_is_login_error(
    final: bytes, message: str, verifier_and_keys: tuple[str, ScramKeys]
) -> None:
    verifier, keys = verifier_and_keys
    backend = ScramBackend(_auth_info_from_verifier(verifier), tamper_final=lambda _f: final)
    with pytest.raises(LoginError, match=message):
        backend.run(UpstreamLogin(USER, scram_keys=keys))


def test_keys_client_first_escapes_saslname_and_has_fresh_nonce() -> None:
    _, keys = make_scram_verifier(PASSWORD, salt=b"sixteen-byte-slt")
    firsts = []
    for _ in range(2):
        login = UpstreamLogin("a=b,c", scram_keys=keys)
        (step,) = _feed(login, AuthenticationSASL(("SCRAM-SHA-256",)).encode())
        initial = parse_sasl_initial_response(_only_send(step))
        assert initial.data is not None
        firsts.append(initial.data)
    for first in firsts:
        assert first.startswith(b"n,,n=a=3Db=2Cc,r=")
    assert firsts[0] != firsts[1]


# ------------------------------------------------------- channel binding


@pytest.fixture(scope="module")
def server_cert_der() -> bytes:
    ca = trustme.CA()
    cert = ca.issue_cert("db.example")
    pem = cert.cert_chain_pems[0].bytes()
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return base64.b64decode(body)


@pytest.mark.parametrize("way", ["password", "keys"])
def test_scram_plus_binds_to_the_certificate(
    way: str, server_cert_der: bytes, verifier_and_keys: tuple[str, ScramKeys]
) -> None:
    verifier, keys = verifier_and_keys
    cb = tls_server_end_point_hash(server_cert_der)
    kwargs = {"password": PASSWORD} if way == "password" else {"scram_keys": keys}
    login = UpstreamLogin(
        USER,
        tls_server_end_point=cb,
        channel_binding_required=True,
        **kwargs,  # type: ignore[arg-type]
    )
    backend = ScramBackend(
        _auth_info_from_verifier(verifier),
        mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"),
        cb_data=cb,
    )
    backend.run(login)
    assert backend.chosen == "SCRAM-SHA-256-PLUS" and login.method == "SCRAM-SHA-256-PLUS"
    assert backend.client_first.startswith(b"p=tls-server-end-point,,")


@pytest.mark.parametrize("way", ["password", "keys"])
def test_scram_plus_with_other_certificate_is_refused_by_the_server(
    way: str, server_cert_der: bytes, verifier_and_keys: tuple[str, ScramKeys]
) -> None:
    """A MITM presenting its own certificate: the hashes differ, the server refuses."""
    verifier, keys = verifier_and_keys
    kwargs = {"password": PASSWORD} if way == "password" else {"scram_keys": keys}
    login = UpstreamLogin(USER, tls_server_end_point=b"\x00" * 32, **kwargs)  # type: ignore[arg-type]
    backend = ScramBackend(
        _auth_info_from_verifier(verifier),
        mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"),
        cb_data=tls_server_end_point_hash(server_cert_der),
    )
    with pytest.raises(Exception, match="channel binding"):
        backend.run(login)


@pytest.mark.parametrize("way", ["password", "keys"])
def test_client_able_to_bind_sends_y_flag_when_server_offers_no_plus(
    way: str, verifier_and_keys: tuple[str, ScramKeys]
) -> None:
    verifier, keys = verifier_and_keys
    kwargs = {"password": PASSWORD} if way == "password" else {"scram_keys": keys}
    login = UpstreamLogin(USER, tls_server_end_point=b"\x07" * 32, **kwargs)  # type: ignore[arg-type]
    backend = ScramBackend(_auth_info_from_verifier(verifier))
    backend.run(login)
    assert backend.client_first.startswith(b"y,,")
    assert login.method == "SCRAM-SHA-256"
