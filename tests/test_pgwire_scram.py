"""SCRAM verifiers and the tls-server-end-point channel binding hash."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from scramp.core import CBindData

from waypoint.pgwire import UnsupportedCertificate, make_scram_verifier, tls_server_end_point_hash
from waypoint.pgwire.scram import certificate_signature_oid, normalize_password


def _cert(key: object, algorithm: hashes.HashAlgorithm | None, **sign_kwargs: object) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db.example")])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(12345)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    cert = builder.sign(key, algorithm, **sign_kwargs)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("algorithm", "expected_hash"),
    [
        (hashes.SHA224(), "sha224"),
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
    ],
)
def test_rsa_certificate_hash_follows_its_signature_hash(
    rsa_key: rsa.RSAPrivateKey, algorithm: hashes.HashAlgorithm, expected_hash: str
) -> None:
    der = _cert(rsa_key, algorithm)
    got = tls_server_end_point_hash(der)
    assert got == hashlib.new(expected_hash, der).digest()
    assert got == bytes(CBindData.from_der(der))  # scramp's (asn1crypto) answer agrees


SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")


@pytest.mark.parametrize(
    ("oid_der", "expected_hash"),
    [
        (bytes.fromhex("06092a864886f70d010105"), "sha256"),  # sha1WithRSAEncryption
        (bytes.fromhex("06092a864886f70d010104"), "sha256"),  # md5WithRSAEncryption
    ],
)
def test_md5_and_sha1_signed_certificates_hash_with_sha256(
    rsa_key: rsa.RSAPrivateKey, oid_der: bytes, expected_hash: str
) -> None:
    """cryptography no longer signs with SHA-1 or MD5: relabel the outer
    signatureAlgorithm of a SHA-256 certificate (the hash does not verify it)."""
    der = _cert(rsa_key, hashes.SHA256())
    at = der.rindex(SHA256_WITH_RSA)
    relabelled = der[:at] + oid_der + der[at + len(oid_der) :]
    assert tls_server_end_point_hash(relabelled) == hashlib.new(expected_hash, relabelled).digest()
    assert tls_server_end_point_hash(relabelled) == bytes(CBindData.from_der(relabelled))


@pytest.mark.parametrize(
    ("algorithm", "expected_hash"),
    [(hashes.SHA256(), "sha256"), (hashes.SHA384(), "sha384"), (hashes.SHA512(), "sha512")],
)
def test_ecdsa_certificate_hash_follows_its_signature_hash(
    algorithm: hashes.HashAlgorithm, expected_hash: str
) -> None:
    der = _cert(ec.generate_private_key(ec.SECP256R1()), algorithm)
    assert tls_server_end_point_hash(der) == hashlib.new(expected_hash, der).digest()
    sig_oid = x509.load_der_x509_certificate(der).signature_algorithm_oid.dotted_string
    assert certificate_signature_oid(der) == sig_oid


@pytest.mark.parametrize(
    ("key", "name", "oid"),
    [
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519", r"1\.3\.101\.112"),
        (ed448.Ed448PrivateKey.generate(), "Ed448", r"1\.3\.101\.113"),
    ],
    ids=["ed25519", "ed448"],
)
def test_eddsa_certificate_cannot_be_bound_and_the_error_names_it(
    key: object, name: str, oid: str
) -> None:
    """EdDSA signatures have no separate hash, so RFC 5929 defines no tls-server-end-point
    data for them (PostgreSQL's server and libpq fail the exchange too)."""
    der = _cert(key, None)
    with pytest.raises(UnsupportedCertificate, match=rf"signed with {name} \({oid}\)"):
        tls_server_end_point_hash(der)


@pytest.mark.parametrize(
    ("algorithm", "expected_hash"),
    [(hashes.SHA256(), "sha256"), (hashes.SHA384(), "sha384"), (hashes.SHA512(), "sha512")],
)
def test_rsa_pss_certificate_binds_with_the_hash_in_its_parameters(
    rsa_key: rsa.RSAPrivateKey, algorithm: hashes.HashAlgorithm, expected_hash: str
) -> None:
    """As PostgreSQL 15 and later (OpenSSL's X509_get_signature_info): the RSASSA-PSS
    parameters' hashAlgorithm."""
    pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
    der = _cert(rsa_key, algorithm, rsa_padding=pss)
    assert certificate_signature_oid(der) == "1.2.840.113549.1.1.10"
    assert tls_server_end_point_hash(der) == hashlib.new(expected_hash, der).digest()


def test_unknown_signature_algorithm_cannot_be_bound(rsa_key: rsa.RSAPrivateKey) -> None:
    der = _cert(rsa_key, hashes.SHA256())
    at = der.rindex(SHA256_WITH_RSA)
    unknown = bytes.fromhex("06092a864886f70d010163")  # 1.2.840.113549.1.1.99
    relabelled = der[:at] + unknown + der[at + len(unknown) :]
    with pytest.raises(UnsupportedCertificate, match=r"1\.2\.840\.113549\.1\.1\.99"):
        tls_server_end_point_hash(relabelled)


@pytest.mark.parametrize(
    "der", [b"", b"\x30", b"\x30\x03\x02\x01\x00", b"\x04\x00", b"\x30\x84\xff\xff\xff\xff"]
)
def test_garbage_instead_of_certificate_is_refused(der: bytes) -> None:
    with pytest.raises(UnsupportedCertificate):
        tls_server_end_point_hash(der)


def test_truncated_certificate_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    der = _cert(rsa_key, hashes.SHA256())
    for cut in (10, len(der) // 2, len(der) - 1):
        with pytest.raises(UnsupportedCertificate):
            tls_server_end_point_hash(der[:cut])


def test_scram_verifier_has_postgres_stored_form() -> None:
    verifier, _keys = make_scram_verifier("pw", salt=b"0123456789abcdef", iterations=4096)
    assert verifier.startswith("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$")
    stored, server = verifier.split("$")[2].split(":")
    assert len(stored) == len(server) == 44
    fresh, fresh_keys = make_scram_verifier("pw")
    assert len(fresh_keys.salt) == 16 and fresh != verifier


@pytest.mark.parametrize("iterations", [1, 4095, 10_000_001])
def test_scram_verifier_refuses_iterations_out_of_range(iterations: int) -> None:
    with pytest.raises(ValueError, match=r"iterations must be 4096\.\.10000000"):
        make_scram_verifier("pw", iterations=iterations)


def test_password_normalization_follows_postgres_saslprep() -> None:
    assert normalize_password("I\u00adX") == b"IX"  # soft hyphen is mapped to nothing
    assert normalize_password("\u0007bell") == "\u0007bell".encode()  # prohibited: used raw
