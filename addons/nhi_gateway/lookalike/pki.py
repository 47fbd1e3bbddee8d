"""Test PKI for the look-alikes: a local CA, the TLS certificate that lets the look-alike answer
as graph.microsoft.com and login.microsoftonline.com, and Entra-shaped token signing keys.

Everything is generated here with ``cryptography`` on first start and kept as PEM files, so a
restarted look-alike serves the same certificate and the same JWKS (a gateway that cached keys
must keep working across a restart, as it does against the real Entra).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names clients use. The gateway maps them to the loopback port but keeps Host and SNI, so
# the look-alike's certificate must be valid for the real names.
SERVER_NAMES = ("graph.microsoft.com", "login.microsoftonline.com", "sts.windows.net", "localhost")
SERVER_ADDRESSES = ("127.0.0.1",)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key.pem"


def b64url(data: bytes) -> str:
    """base64url without padding, the encoding of every JOSE member."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nhi-gateway test equipment"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    # Backdated a day so a client whose clock is slightly behind still accepts the certificate.
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)


def _private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    # Test keys, but still nobody else's business on a shared machine.
    path.write_bytes(data)
    path.chmod(0o600)


def generate_ca(common_name: str = "nhi-gateway look-alike test CA") -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _new_rsa_key()
    not_before, not_after = _validity(3650)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_cert(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    names: tuple[str, ...] = SERVER_NAMES,
    addresses: tuple[str, ...] = SERVER_ADDRESSES,
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _new_rsa_key()
    # Python's ssl module (and OpenSSL 3 clients) reject a leaf longer than 825 days on some
    # platforms and one without serverAuth/SAN everywhere; stay inside those rules.
    not_before, not_after = _validity(397)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


@dataclass(frozen=True)
class ServerPKI:
    """Where the look-alike's TLS material lives on disk."""

    ca_cert: Path  # the gateway (and tests) trust this for upstream connections
    server_cert: Path
    server_key: Path


def ensure_server_pki(directory: Path) -> ServerPKI:
    """Load the CA and server certificate from ``directory``, creating them on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = ServerPKI(
        ca_cert=directory / CA_CERT_FILE,
        server_cert=directory / SERVER_CERT_FILE,
        server_key=directory / SERVER_KEY_FILE,
    )
    if pki.ca_cert.exists() and pki.server_cert.exists() and pki.server_key.exists():
        return pki
    ca_key, ca_cert = generate_ca()
    server_key, server_cert = issue_server_cert(ca_key, ca_cert)
    _write_private(directory / CA_KEY_FILE, _private_key_pem(ca_key))
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.server_key, _private_key_pem(server_key))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return pki


@dataclass(frozen=True)
class SigningKey:
    """An RSA key with a self-signed certificate, the way Entra publishes its signing keys.

    Entra names a key by its certificate: ``kid`` and ``x5t`` are both the base64url SHA-1
    thumbprint of the certificate DER (27 characters). The same type serves as a client
    application's certificate credential for ``client_assertion``.
    """

    private_key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = "accounts.accesscontrol.windows.net") -> SigningKey:
        key = _new_rsa_key()
        not_before, not_after = _validity(730)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def x5t(self) -> str:
        return b64url(hashlib.sha1(self.der).digest())  # noqa: S324 - SHA-1 is what Entra uses for x5t

    @property
    def kid(self) -> str:
        return self.x5t

    @property
    def x5t_s256(self) -> str:
        """``x5t#S256``: what MSAL now puts in client assertions next to (or instead of) ``x5t``."""
        return b64url(hashlib.sha256(self.der).digest())

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def jwk(self, issuer: str | None = None) -> dict:
        """The key as a member of Entra's JWKS. Entra publishes no ``alg``; v2 sets add ``issuer``."""
        numbers = self.public_key.public_numbers()
        entry = {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.x5t,
            "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            # x5c is plain base64 (with padding) of the DER, not base64url (RFC 7517 4.7).
            "x5c": [base64.b64encode(self.der).decode("ascii")],
        }
        if issuer is not None:
            entry["issuer"] = issuer
        return entry

    def save(self, key_path: Path, cert_path: Path) -> None:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, _private_key_pem(self.private_key))
        cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def load(cls, key_path: Path, cert_path: Path) -> SigningKey:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{key_path}: expected an RSA private key")
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
