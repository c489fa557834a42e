"""UpstreamLogin against hostile backends: arbitrary message sequences, SCRAM
exchanges with bad nonces, huge or malformed iteration counts, truncated or
garbled SASL messages, out-of-order and repeated messages.

Only the ProtocolError family may escape ``receive_message``, and:
- a SCRAM login completes only if the server proved the password (the right
  ServerSignature; here the ``@S@`` placeholder stands for a server that knows it);
- with channel binding required, a completed login used SCRAM-SHA-256-PLUS;
- without a password or keys, only trust can complete;
- ``will_derive_key`` never raises;
- the password is never in an error message nor, except for a cleartext request,
  in any byte sent.

``@N@`` in a SASL message becomes the client's nonce, so that the sequences reach
past the nonce check; the nonce check itself is exercised by the other variants.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waypoint.pgwire import (
    Authenticated,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    LoginError,
    Message,
    MessageReader,
    NegotiateProtocolVersion,
    NoticeResponse,
    ProtocolError,
    Send,
    UpstreamLogin,
    build_error_response,
    build_message,
    make_scram_verifier,
    parse_sasl_initial_response,
)
from waypoint.pgwire.scram import MAX_ITERATIONS

USER = "wp_hostile"
PASSWORD = "hostile-Pa55word-91c2"
SALT = b"fedcba9876543210"
_, KEYS = make_scram_verifier(PASSWORD, iterations=4096, salt=SALT)
CB_DATA = bytes(range(32, 64))
SALT_B64 = base64.b64encode(SALT).decode()

# -------------------------------------------------------------- strategies

# Iteration counts: valid and cheap, below the floor, above the ceiling (refused before
# any PBKDF2), and texts that are not a plain decimal number.
iterations_st = st.one_of(
    st.sampled_from(["4096", "4097", "8192"]),
    st.integers(-10, 4095).map(str),
    st.integers(MAX_ITERATIONS + 1, 10**30).map(str),
    st.sampled_from(
        ["", "0", "-4096", "+4096", " 4096", "4096 ", "4_096", "0x1000", "1e4", "٤٠٩٦", "4096\0"]
    ),
)
salt_st = st.one_of(
    st.just(SALT_B64),
    st.binary(min_size=1, max_size=24).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(["", "====", "not base64!", "QUJD", "QUJDRA", "é"]),
)
nonce_st = st.one_of(
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","), max_size=12
    ).map(lambda ext: "@N@" + ext),
    st.text(max_size=30),  # not extending the client nonce
    st.just("@N@ \x7f"),
    st.just("@N@é"),
)


@st.composite
def server_first_st(draw: st.DrawFn) -> bytes:
    attrs = [f"r={draw(nonce_st)}", f"s={draw(salt_st)}", f"i={draw(iterations_st)}"]
    shape = draw(st.sampled_from(["ok", "shuffle", "drop", "extra", "error", "truncate", "m"]))
    if shape == "shuffle":
        attrs = draw(st.permutations(attrs))
    elif shape == "drop":
        del attrs[draw(st.integers(0, 2))]
    elif shape == "extra":
        attrs.insert(draw(st.integers(0, 3)), draw(st.sampled_from(["m=1", "x=y", "", "r=@N@b"])))
    elif shape == "error":
        attrs = ["e=" + draw(st.text(max_size=20))]
    elif shape == "m":
        attrs.insert(0, "m=ext")
    data = ",".join(attrs).encode("utf-8", "surrogatepass")
    if shape == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data


# A well-formed server-first-message (salt and count may or may not match the keys).
valid_server_first_st = st.builds(
    lambda ext, salt, it: f"r=@N@{ext},s={salt},i={it}".encode(),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from([SALT_B64, "c2FsdA=="]),
    st.sampled_from(["4096", "4097"]),
)

server_final_st = st.one_of(
    st.just(b"v=@S@"),
    st.binary(max_size=40).map(lambda b: b"v=" + base64.b64encode(b)),
    st.sampled_from([b"", b"v=", b"v=@S@,x=1", b"e=other-error", b"v=!!", b"\xffv=@S@", b"x=@S@"]),
    st.binary(max_size=40),
)
mechanisms_st = st.lists(
    st.sampled_from(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "OAUTHBEARER", "x"]),
    min_size=1,
    max_size=3,
)


def _auth(code: int, data: bytes = b"") -> bytes:
    return build_message(b"R", struct.pack("!i", code) + data)


message_st = st.one_of(
    st.just(AuthenticationOk().encode()),
    st.just(AuthenticationCleartextPassword().encode()),
    st.binary(min_size=4, max_size=4).map(lambda s: AuthenticationMD5Password(s).encode()),
    mechanisms_st.map(lambda m: AuthenticationSASL(tuple(m)).encode()),
    server_first_st().map(lambda d: AuthenticationSASLContinue(d).encode()),
    server_final_st.map(lambda d: AuthenticationSASLFinal(d).encode()),
    st.sampled_from([2, 6, 7, 8, 9, 13, -1, 2**31 - 1]).map(_auth),  # methods we refuse
    st.binary(max_size=6).map(lambda b: build_message(b"R", b)),  # truncated / garbled R
    st.just(NegotiateProtocolVersion(0, ("_pq_.x",)).encode()),
    st.just(NoticeResponse({"S": "NOTICE", "M": "hello"}).encode()),
    st.just(build_error_response("FATAL", "28P01", "password authentication failed")),
    st.sampled_from([b"S", b"K", b"Z", b"E", b"N", b"v", b"D"]).flatmap(
        lambda t: st.binary(max_size=20).map(lambda b: build_message(t, b))
    ),
)

# A full SCRAM exchange whose steps are each drawn from the hostile variants, then
# anything: reaches the final checks far more often than a free sequence does.
scram_flow_st = st.builds(
    lambda mechs, first, final, tail: [
        AuthenticationSASL(tuple(mechs)).encode(),
        AuthenticationSASLContinue(first).encode(),
        AuthenticationSASLFinal(final).encode(),
        *tail,
    ],
    mechanisms_st,
    st.one_of(valid_server_first_st, server_first_st()),
    st.one_of(st.just(b"v=@S@"), server_final_st),
    st.one_of(st.just([AuthenticationOk().encode()]), st.lists(message_st, max_size=3)),
)
sequence_st = st.one_of(st.lists(message_st, min_size=1, max_size=8), scram_flow_st)

credentials_st = st.fixed_dictionaries(
    {
        "password": st.sampled_from([PASSWORD, None]),
        "scram_keys": st.sampled_from([KEYS, None]),
        "tls_server_end_point": st.sampled_from([CB_DATA, None]),
        "channel_binding_required": st.booleans(),
    }
)

# ------------------------------------------------------------------ driver


def _client_nonce(sent: bytes) -> str | None:
    reader = MessageReader()
    reader.feed(sent)
    msg = reader.next_message()
    if msg is None:
        return None
    try:
        initial = parse_sasl_initial_response(msg)
    except ProtocolError:
        return None
    for attr in (initial.data or b"").decode().split(","):
        if attr.startswith("r="):
            return attr[2:]
    return None


def run_hostile(credentials: dict[str, object], stream: list[bytes]) -> tuple[UpstreamLogin, bool]:
    """Feed ``stream`` to a login; returns it and whether the real signature was supplied."""
    login = UpstreamLogin(USER, **credentials)  # type: ignore[arg-type]
    reader = MessageReader(max_message_size=1 << 16)
    nonce: str | None = None
    signature_supplied = False
    password_sent_in_clear = False
    try:
        for raw in stream:
            reader.feed(raw)
            while (msg := reader.next_message()) is not None:
                body = msg.body
                if msg.type == b"R" and nonce is not None:
                    body = body.replace(b"@N@", nonce.encode())
                if msg.type == b"R" and body[:4] == struct.pack("!i", 12) and b"@S@" in body:
                    sig = login._expected_signature  # a server that knows the password
                    body = body.replace(b"@S@", base64.b64encode(sig))
                    signature_supplied = bool(sig)
                msg = Message(msg.type, body)
                assert isinstance(login.will_derive_key(msg), bool)
                step = login.receive_message(msg)
                if isinstance(step, Send):
                    nonce = nonce or _client_nonce(step.data)
                    if PASSWORD.encode() in step.data:
                        password_sent_in_clear = True
                        assert login.method == "password"
                if isinstance(step, Authenticated):
                    return login, signature_supplied
    except ProtocolError as exc:
        assert PASSWORD not in str(exc)
        assert not login.authenticated
    if password_sent_in_clear:
        assert credentials["password"] is not None
    return login, signature_supplied


def _check_outcome(login: UpstreamLogin, credentials: dict[str, object], signed: bool) -> None:
    if not login.authenticated:
        return
    if credentials["channel_binding_required"]:
        assert login.method == "SCRAM-SHA-256-PLUS"
    if login.method in ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"):
        assert signed, "SCRAM login completed without the server proving the password"
    if credentials["password"] is None and credentials["scram_keys"] is None:
        assert login.method == "trust"


@given(credentials=credentials_st, stream=sequence_st)
def test_hostile_backend_sequences_raise_only_protocol_errors(
    credentials: dict[str, object], stream: list[bytes]
) -> None:
    login, signed = run_hostile(credentials, stream)
    _check_outcome(login, credentials, signed)


@given(credentials=credentials_st, stream=sequence_st, cut=st.integers(1, 7))
def test_hostile_sequences_cut_into_pieces_behave_the_same(
    credentials: dict[str, object], stream: list[bytes], cut: int
) -> None:
    joined = b"".join(stream)
    pieces = [joined[i : i + cut] for i in range(0, len(joined), cut)]
    login, signed = run_hostile(credentials, pieces)
    _check_outcome(login, credentials, signed)


@pytest.mark.parametrize(
    "iterations", [str(MAX_ITERATIONS + 1), "4294967296", "99999999999", "1" + "0" * 40]
)
@pytest.mark.parametrize("with_keys", [True, False])
def test_huge_iteration_count_is_refused_before_any_key_derivation(
    iterations: str, with_keys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    login = UpstreamLogin(USER, PASSWORD, scram_keys=KEYS if with_keys else None)
    step = login.receive_message(_one(AuthenticationSASL(("SCRAM-SHA-256",)).encode()))
    assert isinstance(step, Send)
    nonce = _client_nonce(step.data)
    assert nonce
    cont = _one(
        AuthenticationSASLContinue(f"r={nonce}srv,s={SALT_B64},i={iterations}".encode()).encode()
    )
    assert login.will_derive_key(cont) is (not with_keys)  # scramp's own way says yes up front
    # Both key derivations (ours and scramp's) look hashlib.pbkdf2_hmac up at call time.
    derivations: list[int] = []
    real_pbkdf2 = hashlib.pbkdf2_hmac

    def counting_pbkdf2(name: str, password: bytes, salt: bytes, rounds: int) -> bytes:
        derivations.append(rounds)
        return real_pbkdf2(name, password, salt, min(rounds, 4096))

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting_pbkdf2)
    with pytest.raises(LoginError, match="iteration count"):
        login.receive_message(cont)
    assert derivations == []  # refused before any PBKDF2 ran


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=@N@",  # nonce not extended
        b"r=xyz@N@abc,s=" + SALT_B64.encode() + b",i=4096",  # nonce not a prefix
        b"r=@N@abc,s=,i=4096",  # empty salt
        b"r=@N@abc,s=" + SALT_B64.encode(),  # no iteration count
        b"r=@N@a\x7fb,s=" + SALT_B64.encode() + b",i=4096",  # unprintable nonce
        b"r=@N@abc,s=" + SALT_B64.encode() + b",i=4096,x=1",  # extra attribute
        b"r=@N@abc,s="
        + SALT_B64.encode()
        + b",i=\xd9\xa4\xd9\xa0\xd9\xa9\xd9\xa6",  # Arabic digits
        b"r=@N@abc,s=" + SALT_B64.encode()[:-3] + b",i=4096",  # truncated base64
    ],
)
def test_malformed_server_first_is_a_login_error(server_first: bytes) -> None:
    login = UpstreamLogin(USER, PASSWORD)
    nonce = _client_nonce(
        _sent(login.receive_message(_one(AuthenticationSASL(("SCRAM-SHA-256",)).encode())))
    )
    assert nonce
    body = server_first.replace(b"@N@", nonce.encode())
    with pytest.raises(LoginError):
        login.receive_message(_one(AuthenticationSASLContinue(body).encode()))
    assert not login.authenticated


def _one(data: bytes) -> Message:
    reader = MessageReader()
    reader.feed(data)
    msg = reader.next_message()
    assert msg is not None and reader.buffered == 0
    return msg


def _sent(step: object) -> bytes:
    assert isinstance(step, Send)
    return step.data
