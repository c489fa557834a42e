"""SCRAM-SHA-256 client pieces (RFC 5802 / RFC 7677), password verifiers and
the ``tls-server-end-point`` channel binding (RFC 5929).

scramp makes the verifiers' arithmetic reference and plays the server in
tests; the proof arithmetic here exists so that a login can reuse the
SaltedPassword kept from when the verifier was made (SPEC §8 way (b)), with no
PBKDF2 on the connect path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final

import attrs
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


def _is_printable_nonce(nonce: str) -> bool:
    return all(0x21 <= ord(ch) <= 0x7E and ch != "," for ch in nonce)


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
    proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
    server_key = _hmac(salted_password, b"Server Key")
    return proof, _hmac(server_key, auth_message)


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

# DER-encoded signature algorithm OIDs → hash for tls-server-end-point.  MD5
# and SHA-1 are replaced by SHA-256 (RFC 5929 §4.1), as PostgreSQL does.
# Algorithms without a separate hash (RSASSA-PSS, Ed25519, Ed448) are refused,
# as PostgreSQL refuses them.
_SIGNATURE_HASHES: Final[dict[str, str]] = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption
    "1.3.14.3.2.29": "sha256",  # sha1WithRSASignature (OIW)
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10040.4.3": "sha256",  # dsa-with-sha1
    "2.16.840.1.101.3.4.3.1": "sha224",  # dsa-with-sha224
    "2.16.840.1.101.3.4.3.2": "sha256",  # dsa-with-sha256
    "2.16.840.1.101.3.4.3.10": "sha3_256",  # ecdsa-with-SHA3-256
    "2.16.840.1.101.3.4.3.11": "sha3_384",
    "2.16.840.1.101.3.4.3.12": "sha3_512",
    "2.16.840.1.101.3.4.3.14": "sha3_256",  # RSA with SHA3-256
    "2.16.840.1.101.3.4.3.15": "sha3_384",
    "2.16.840.1.101.3.4.3.16": "sha3_512",
}


def _der_tlv(data: bytes, pos: int, what: str) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise UnsupportedCertificate(f"certificate DER truncated at {what}")
    tag = data[pos]
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise UnsupportedCertificate(f"certificate DER has a bad length at {what}")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise UnsupportedCertificate(f"certificate DER truncated in {what}")
    return tag, pos, end


def _decode_oid(raw: bytes) -> str:
    if not raw:
        raise UnsupportedCertificate("certificate DER has an empty algorithm OID")
    arcs: list[int] = []
    value = 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if raw[-1] & 0x80:
        raise UnsupportedCertificate("certificate DER has a truncated algorithm OID")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def certificate_signature_oid(cert_der: bytes) -> str:
    """The dotted OID of the certificate's signatureAlgorithm."""
    tag, start, end = _der_tlv(cert_der, 0, "Certificate")
    if tag != 0x30 or end != len(cert_der):
        raise UnsupportedCertificate("not a DER certificate (outer SEQUENCE)")
    tag, _tbs_start, tbs_end = _der_tlv(cert_der, start, "tbsCertificate")
    if tag != 0x30:
        raise UnsupportedCertificate("not a DER certificate (tbsCertificate)")
    tag, alg_start, _alg_end = _der_tlv(cert_der, tbs_end, "signatureAlgorithm")
    if tag != 0x30:
        raise UnsupportedCertificate("not a DER certificate (signatureAlgorithm)")
    tag, oid_start, oid_end = _der_tlv(cert_der, alg_start, "signature OID")
    if tag != 0x06:
        raise UnsupportedCertificate("not a DER certificate (signature OID)")
    return _decode_oid(cert_der[oid_start:oid_end])


def tls_server_end_point_hash(cert_der: bytes) -> bytes:
    """RFC 5929 ``tls-server-end-point`` data for the backend's certificate:
    its DER hashed with its signature's hash (SHA-256 for MD5 and SHA-1).

    Parses the signatureAlgorithm itself (no dependency on ``cryptography``).
    Certificates whose signature has no separate hash (RSASSA-PSS, EdDSA)
    raise :class:`UnsupportedCertificate`: PostgreSQL cannot bind them either.
    """
    oid = certificate_signature_oid(cert_der)
    name = _SIGNATURE_HASHES.get(oid)
    if name is None:
        raise UnsupportedCertificate(
            f"no tls-server-end-point hash for certificate signature algorithm {oid}"
        )
    return hashlib.new(name, cert_der).digest()
