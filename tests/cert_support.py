"""Certificates that trustme does not make: Ed25519 (its signature has no separate hash, so no
tls-server-end-point channel binding exists for it) and RSASSA-PSS (bound with the hash named
in its signature's parameters)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any, Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.x509.oid import NameOID

KeyType = Literal["ed25519", "rsa-pss"]


@attrs.frozen
class TestCertificate:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        """(ca, certificate, key) files in ``directory``; the key is 0600."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = (directory / "ca.pem", directory / "server.crt", directory / "server.key")
        for path, data in zip(paths, (self.ca_pem, self.cert_pem, self.key_pem), strict=True):
            path.write_bytes(data)
        paths[2].chmod(0o600)
        return paths


def _key(key_type: KeyType) -> Any:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign_args(key_type: KeyType) -> dict[str, Any]:
    if key_type == "ed25519":
        return {"algorithm": None}
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    return {"algorithm": hashes.SHA384(), "rsa_padding": pss}


def make_certificate(key_type: KeyType, host: str = "127.0.0.1") -> TestCertificate:
    """A CA and a server certificate it signed, for ``host`` (an IP address): Ed25519 keys
    and signatures, or RSA keys with RSASSA-PSS (SHA-384) signatures."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key(key_type)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Waypoint test Ed25519 CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, **_sign_args(key_type))
    )
    key = _key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, **_sign_args(key_type))
    )
    pem = serialization.Encoding.PEM
    return TestCertificate(
        ca_pem=ca.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
