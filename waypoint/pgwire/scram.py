"""SCRAM-SHA-256 client pieces (RFC 5802 / RFC 7677), password verifiers and
the ``tls-server-end-point`` channel binding (RFC 5929).

scramp makes the verifiers' arithmetic reference and plays the server in
tests; the proof arithmetic here exists so that a login can reuse the
SaltedPassword kept from when the verifier was made, with no PBKDF2 on the
connect path. Certificates are parsed with ``cryptography`` (the one X.509
parser of the program; parsing is not I/O).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from typing import Final

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from scramp.utils import saslprep

from .errors import LoginError, UnsupportedCertificate

__all__ = [
    "MAX_ITERATIONS",
    "MIN_ITERATIONS",
    "ScramKeys",
    "ServerFirst",
    "client_first_bare",
    "client_proof_and_server_signature",
    "derive_salted_password",
    "gs2_header",
    "make_md5_verifier",
    "make_scram_verifier",
    "parse_server_first",
    "tls_server_end_point_hash",
    "verify_server_final",
]

#: RFC 7677's floor; a server asking for fewer iterations is refused.
MIN_ITERATIONS: Final = 4096
#: A guard against a server making us (or scramp) burn CPU: scramp's own bound.
MAX_ITERATIONS: Final = 10_000_000
_SALT_LENGTH: Final = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
_NONCE_BYTES: Final = 18  # PostgreSQL's SCRAM_RAW_NONCE_LEN
_HASH: Final = "sha256"


@attrs.frozen
class ScramKeys:
    """What is kept from making a SCRAM verifier so that a login needs no PBKDF2.

    ``salted_password`` is as good as the password for logging in: it is never
    shown in a repr.
    """

    salted_password: bytes = attrs.field(repr=False)
    salt: bytes
    iterations: int


def normalize_password(password: str) -> bytes:
    """SASLprep as PostgreSQL applies it: if the password is not valid for
    SASLprep it is used as it is (``pg_saslprep`` falls back the same way)."""
    try:
        prepared: str = saslprep(password)
    except Exception:
        prepared = password
    return prepared.encode("utf-8")


def derive_salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Hi(Normalize(password), salt, i): one PBKDF2-HMAC-SHA-256."""
    return hashlib.pbkdf2_hmac(_HASH, normalize_password(password), salt, iterations)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, _HASH).digest()


def make_scram_verifier(
    secret: str, *, iterations: int = MIN_ITERATIONS, salt: bytes | None = None
) -> tuple[str, ScramKeys]:
    """PostgreSQL's stored form ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``
    and the keys a later login can use instead of the password."""
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be {MIN_ITERATIONS}..{MAX_ITERATIONS}, got {iterations}")
    if salt is None:
        salt = secrets.token_bytes(_SALT_LENGTH)
    elif not salt:
        raise ValueError("the salt cannot be empty")
    salted = derive_salted_password(secret, salt, iterations)
    stored_key = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    server_key = _hmac(salted, b"Server Key")
    b64 = _b64encode
    verifier = f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
    return verifier, ScramKeys(salted_password=salted, salt=salt, iterations=iterations)


def make_md5_verifier(secret: str, role: str) -> str:
    """PostgreSQL's MD5 form: ``"md5" + md5hex(secret + role)``."""
    digest = hashlib.md5((secret + role).encode("utf-8"), usedforsecurity=False)
    return "md5" + digest.hexdigest()


def md5_response(password: str, user: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password: md5(md5(password + user) + salt)."""
    inner = make_md5_verifier(password, user)[3:]
    outer = hashlib.md5(inner.encode("ascii") + salt, usedforsecurity=False)
    return "md5" + outer.hexdigest()


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise LoginError(f"malformed SCRAM {what}: invalid base64") from None


# ------------------------------------------------------------ client messages


def gs2_header(channel_binding: bytes | None, use_binding: bool) -> str:
    """``p=tls-server-end-point,,`` when binding, ``y,,`` when we could bind
    but the server did not offer it, ``n,,`` without TLS data."""
    if use_binding:
        if channel_binding is None:
            raise ValueError("channel binding needs the tls-server-end-point hash")
        return "p=tls-server-end-point,,"
    return "y,," if channel_binding is not None else "n,,"


def _saslname(user: str) -> str:
    return user.replace("=", "=3D").replace(",", "=2C")


def new_client_nonce() -> str:
    return _b64encode(secrets.token_bytes(_NONCE_BYTES))


def client_first_bare(user: str, nonce: str) -> str:
    return f"n={_saslname(user)},r={nonce}"


@attrs.frozen
class ServerFirst:
    message: str
    nonce: str
    salt: bytes
    iterations: int


#: RFC 5802's ``printable``: %x21-2B / %x2D-7E (no comma), as a nonce is made of.
_PRINTABLE_NONCE: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]*")


def _is_printable_nonce(nonce: str) -> bool:
    return _PRINTABLE_NONCE.fullmatch(nonce) is not None


def parse_server_first(data_untrusted: bytes, client_nonce: str) -> ServerFirst:
    """Check and parse ``r=<nonce>,s=<salt>,i=<iterations>`` (PostgreSQL sends
    exactly these three; anything else is refused, as libpq does)."""
    try:
        text = data_untrusted.decode("ascii")
    except UnicodeDecodeError:
        raise LoginError("malformed SCRAM server-first-message: not ASCII") from None
    if text.startswith("e="):
        raise LoginError(f"SCRAM server reported an error: {text[2:200]}")
    parts = text.split(",")
    if len(parts) != 3 or not (
        parts[0].startswith("r=") and parts[1].startswith("s=") and parts[2].startswith("i=")
    ):
        raise LoginError(
            "malformed SCRAM server-first-message: expected exactly r=,s=,i= attributes"
        )
    nonce, salt_b64, iter_text = parts[0][2:], parts[1][2:], parts[2][2:]
    if not _is_printable_nonce(nonce):
        raise LoginError("malformed SCRAM server-first-message: invalid nonce characters")
    if not nonce.startswith(client_nonce) or len(nonce) <= len(client_nonce):
        raise LoginError(
            "SCRAM server nonce does not extend the client nonce (possible replay or MITM)"
        )
    salt = _b64decode(salt_b64, "salt")
    if not salt:
        raise LoginError("malformed SCRAM server-first-message: empty salt")
    if not iter_text.isascii() or not iter_text.isdigit() or len(iter_text) > 10:
        raise LoginError(
            f"malformed SCRAM server-first-message: invalid iteration count {iter_text[:20]!r}"
        )
    iterations = int(iter_text)
    if iterations < MIN_ITERATIONS:
        raise LoginError(
            f"SCRAM iteration count {iterations} is below the minimum of {MIN_ITERATIONS}"
        )
    if iterations > MAX_ITERATIONS:
        raise LoginError(
            f"SCRAM iteration count {iterations} is above the maximum of {MAX_ITERATIONS}"
        )
    return ServerFirst(text, nonce, salt, iterations)


def client_final_without_proof(header: str, channel_binding: bytes | None, nonce: str) -> str:
    cbind_input = header.encode("ascii")
    if header.startswith("p="):
        assert channel_binding is not None
        cbind_input += channel_binding
    return f"c={_b64encode(cbind_input)},r={nonce}"


def client_proof_and_server_signature(
    salted_password: bytes, auth_message: bytes
) -> tuple[bytes, bytes]:
    """RFC 5802 §3: ClientProof and the ServerSignature to expect."""
    client_key = _hmac(salted_password, b"Client Key")
    stored_key = hashlib.sha256(client_key).digest()
    client_signature = _hmac(stored_key, auth_message)
    proof = _xor(client_key, client_signature)
    server_key = _hmac(salted_password, b"Server Key")
    return proof, _hmac(server_key, auth_message)


def _xor(a: bytes, b: bytes) -> bytes:
    """``a`` XOR ``b``, byte for byte (equal lengths)."""
    if len(a) != len(b):
        raise ValueError("XOR of byte strings of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def client_final(without_proof: str, proof: bytes) -> str:
    return f"{without_proof},p={_b64encode(proof)}"


def verify_server_final(data_untrusted: bytes, expected_signature: bytes) -> None:
    """Check ``v=<ServerSignature>`` against what the proof computation
    expects.  The one verification path for both ways of logging in."""
    try:
        text = data_untrusted.decode("ascii")
    except UnicodeDecodeError:
        raise LoginError("malformed SCRAM server-final-message: not ASCII") from None
    if text.startswith("e="):
        raise LoginError(f"SCRAM server reported an error: {text[2:200]}")
    if not text.startswith("v=") or "," in text:
        raise LoginError("malformed SCRAM server-final-message: expected exactly v=")
    signature = _b64decode(text[2:], "server signature")
    if not hmac.compare_digest(signature, expected_signature):
        raise LoginError("SCRAM server signature is wrong: the server does not know the password")


# ------------------------------------------------------- channel binding hash

#: Signature algorithms with no separate hash: no tls-server-end-point data exists
#: for a certificate signed with them (RFC 5929 leaves it undefined; PostgreSQL's
#: server and libpq fail the SCRAM-SHA-256-PLUS exchange for them too).
_UNBINDABLE: Final[dict[str, str]] = {
    "1.3.101.112": "Ed25519",
    "1.3.101.113": "Ed448",
}


def _load_certificate(cert_der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise UnsupportedCertificate(f"not a DER certificate: {str(exc)[:120]}") from None


def certificate_signature_oid(cert_der: bytes) -> str:
    """The dotted OID of the certificate's signatureAlgorithm."""
    return _load_certificate(cert_der).signature_algorithm_oid.dotted_string


def tls_server_end_point_hash(cert_der: bytes) -> bytes:
    """RFC 5929 ``tls-server-end-point`` data for the backend's certificate:
    its DER hashed with its signature's hash, SHA-256 when that is MD5 or SHA-1.

    As PostgreSQL's ``be_tls_get_certificate_hash`` (OpenSSL's
    ``X509_get_signature_info``): an RSASSA-PSS signature binds with the hash
    named in its parameters; Ed25519 and Ed448 have no such hash and raise
    :class:`UnsupportedCertificate` naming the algorithm, as does anything
    that is not a certificate or whose signature algorithm is unknown.
    """
    cert = _load_certificate(cert_der)
    oid = cert.signature_algorithm_oid.dotted_string
    unbindable = _UNBINDABLE.get(oid)
    if unbindable is not None:
        raise UnsupportedCertificate(
            f"the certificate is signed with {unbindable} ({oid}), which has no "
            "tls-server-end-point hash: channel binding is impossible with it"
        )
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if algorithm is None:
        raise UnsupportedCertificate(
            f"no tls-server-end-point hash for certificate signature algorithm {oid}"
        )
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()
