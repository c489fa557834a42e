"""atheris target: ``UpstreamLogin`` against a hostile backend.

The input is the control byte (which credentials the login has, whether it may or
must bind the channel) and then the backend's byte stream, cut into messages by
``MessageReader``. Two placeholders stand for what a real server would know: ``@N@``
in an authentication message becomes the client's SCRAM nonce (so the fuzzer gets
past the nonce check) and ``@S@`` becomes the server signature the login expects
(a server that knows the password). Only ProtocolError (LoginError, BackendError)
may escape. Properties:

- a SCRAM login completes only when ``@S@`` supplied the right signature;
- with channel binding required, a completed login is SCRAM-SHA-256-PLUS;
- without password or keys, only trust completes;
- ``will_derive_key`` never raises;
- the password never appears in an error message.

The iteration ceiling is lowered to 20,000 for the run (each PBKDF2 at the real
ceiling of 10,000,000 takes seconds); the check itself is the same code.

    python tests/fuzz/fuzz_login.py -max_total_time=600 tests/fuzz/corpus/login
"""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Chunks, fuzz, instrumentation

with instrumentation(__name__ == "__main__"):
    from waypoint.pgwire import scram
    from waypoint.pgwire.errors import ProtocolError
    from waypoint.pgwire.framing import Message, MessageReader
    from waypoint.pgwire.login import Authenticated, Send, UpstreamLogin
    from waypoint.pgwire.messages import parse_sasl_initial_response

USER = "wp_fuzz"
PASSWORD = "fuzz-Password-7f3a"
SALT = b"0123456789abcdef"
_, KEYS = scram.make_scram_verifier(PASSWORD, iterations=4096, salt=SALT)
CB_DATA = bytes(range(32))
FUZZ_MAX_ITERATIONS = 20_000
_SASL_FINAL = (12).to_bytes(4, "big")


@contextlib.contextmanager
def _lowered_iteration_ceiling() -> Iterator[None]:
    saved = scram.MAX_ITERATIONS
    scram.MAX_ITERATIONS = FUZZ_MAX_ITERATIONS  # type: ignore[misc]
    try:
        yield
    finally:
        scram.MAX_ITERATIONS = saved  # type: ignore[misc]


def _client_nonce(sent: bytes) -> str | None:
    reader = MessageReader()
    reader.feed(sent)
    msg = reader.next_message()
    if msg is None or msg.type != b"p":
        return None
    try:
        initial = parse_sasl_initial_response(msg)
    except ProtocolError:
        return None  # not a SASLInitialResponse (a password message)
    text = (initial.data or b"").decode("utf-8")
    for attr in text.split(","):
        if attr.startswith("r="):
            return attr[2:]
    return None


def test_one_input(data: bytes) -> None:
    chunks = Chunks(data)
    control = chunks.control
    password = PASSWORD if control & 1 else None
    keys = KEYS if control & 2 else None
    cb = CB_DATA if control & 4 else None
    cb_required = bool(control & 8)
    login = UpstreamLogin(
        USER,
        password,
        scram_keys=keys,
        tls_server_end_point=cb,
        channel_binding_required=cb_required,
    )
    reader = MessageReader(max_message_size=1 << 16)
    nonce: str | None = None
    signature_supplied = False
    with _lowered_iteration_ceiling():
        try:
            reader.feed(chunks.payload)
            while (msg := reader.next_message()) is not None:
                body = msg.body
                if msg.type == b"R":
                    if nonce is not None:
                        body = body.replace(b"@N@", nonce.encode("ascii"))
                    if b"@S@" in body and body.startswith(_SASL_FINAL):
                        sig = login._expected_signature  # what a server knowing the password sends
                        body = body.replace(b"@S@", base64.b64encode(sig))
                        signature_supplied = bool(sig)
                    msg = Message(b"R", body)
                login.will_derive_key(msg)  # must never raise
                step = login.receive_message(msg)
                if isinstance(step, Send) and nonce is None:
                    nonce = _client_nonce(step.data)
                if isinstance(step, Authenticated):
                    break
        except ProtocolError as exc:
            assert PASSWORD not in str(exc)
            assert not login.authenticated
            return
    if login.authenticated:
        method = login.method
        if cb_required:
            assert method == "SCRAM-SHA-256-PLUS", method
        if method is not None and method.startswith("SCRAM"):
            assert signature_supplied, "SCRAM login completed without the server's signature"
        if password is None and keys is None:
            assert method == "trust", method


if __name__ == "__main__":
    fuzz(test_one_input)
