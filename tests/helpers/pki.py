"""A throwaway PKI for TLS tests: a CA, a server certificate for localhost, a client certificate."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Key = ec.EllipticCurvePrivateKey


def issue(
    subject: str, issuer: tuple[x509.Certificate, Key] | None, *, server: bool = False
) -> tuple[x509.Certificate, Key]:
    """Return a certificate for subject and its key, signed by issuer (self-signed if None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return certificate, key


def pem(certificate: x509.Certificate) -> bytes:
    """Return the certificate in PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    """Return the private key in unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pki(tmp_path: Path) -> dict[str, Path | bytes]:
    """Write a CA, a server certificate for localhost and a client certificate."""
    ca = issue("test-ca", None)
    server_cert, server_key = issue("localhost", ca, server=True)
    client_cert, client_key = issue("test-client", ca)
    files: dict[str, Path | bytes] = {}
    for name, content in {
        "ca.pem": pem(ca[0]),
        "server.pem": pem(server_cert),
        "server.key": key_pem(server_key),
    }.items():
        (tmp_path / name).write_bytes(content)
        files[name] = tmp_path / name
    files["ca.key"] = ca[1]  # type: ignore[assignment]  # to issue renewals
    files["client.pem"] = pem(client_cert)
    files["client.key"] = key_pem(client_key)
    return files


def tls_settings(pki: dict[str, Path | bytes], *, client_ca: bool) -> dict[str, str]:
    """Return the settings serving pki's server certificate; client_ca: requiring a client's."""
    settings = {"tls_cert_file": str(pki["server.pem"]), "tls_key_file": str(pki["server.key"])}
    if client_ca:
        settings["tls_client_ca_file"] = str(pki["ca.pem"])
    return settings
