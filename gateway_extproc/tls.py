"""The ext_proc server's TLS key pair: read from a directory, or made up at start.

Gateways that call an InferencePool's endpoint picker (Envoy AI Gateway, Envoy Gateway's
InferencePool support, kgateway) connect with TLS and, by the Gateway API Inference
Extension's convention, do not verify the certificate; the reference picker therefore
serves a self-signed one unless it is given `--cert-path`. This module does the same:
`--cert-path DIR` reads DIR/tls.crt and DIR/tls.key (a Kubernetes TLS Secret mounted as a
directory), otherwise a fresh self-signed certificate is made for this process only.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)


class TLSConfigError(ValueError):
    """The certificate directory is unusable; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    certificate_pem: bytes
    private_key_pem: bytes
    self_signed: bool


def server_key_pair(cert_path: str) -> KeyPair:
    """The key pair to serve with: from `cert_path` when given, else self-signed."""
    return load_key_pair(Path(cert_path)) if cert_path else self_signed_key_pair()


def load_key_pair(directory: Path) -> KeyPair:
    """tls.crt and tls.key from `directory`, checked to be PEM that belongs together."""
    files = {}
    for name in (CERT_FILE, KEY_FILE):
        try:
            files[name] = (directory / name).read_bytes()
        except OSError as exc:
            raise TLSConfigError(f"--cert-path: cannot read {directory / name}: {exc}") from None
    try:
        certificate = x509.load_pem_x509_certificate(files[CERT_FILE])
    except ValueError as exc:
        raise TLSConfigError(f"--cert-path: {CERT_FILE} is not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(files[KEY_FILE], password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(
            f"--cert-path: {KEY_FILE} is not an unencrypted PEM private key: {exc}"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.PEM
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        raise TLSConfigError(f"--cert-path: {KEY_FILE} is not the key of {CERT_FILE}")
    return KeyPair(files[CERT_FILE], files[KEY_FILE], self_signed=False)


def self_signed_key_pair() -> KeyPair:
    """A new P-256 key and a certificate for it, signed by itself, for this host name."""
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname() or "gateway-extproc"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gateway-extproc"),
            x509.NameAttribute(NameOID.COMMON_NAME, host[:64]),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host[:253])]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        self_signed=True,
    )
