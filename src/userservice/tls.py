"""Server TLS credentials that follow their files, so certificate rotations need no restart.

grpc's dynamic server credentials ask a fetcher for a new certificate configuration on
every TLS handshake (from a grpc core thread, with grpc.aio too); the fetcher returns
None for "no change". It looks at the files' inode, size and modification time at most
every ``reload_check_seconds`` and rebuilds the configuration only when they changed and
the new certificate and key belong together: a certificate written before its key (or the
other way round) keeps the previous pair until the second file lands. Connections already
open keep the certificate they were set up with; new handshakes get the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from userservice.file_signature import FileSignature, file_signature

_log: Final = logging.getLogger("userservice.tls")


class TlsFilesError(ValueError):
    """The TLS files cannot be used together (unparsable, or the key does not fit)."""


_PEM_PARSERS: Final[dict[str, Callable[[bytes], Any]]] = {
    "certificates": x509.load_pem_x509_certificates,
    "private key": lambda data: serialization.load_pem_private_key(data, None),
}


def check_pem_file(path: str, kind: str) -> None:
    """Parse path as PEM of kind ("certificates" or "private key"); raise TlsFilesError if not."""
    try:
        _PEM_PARSERS[kind](Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as error:
        raise TlsFilesError(f"cannot parse {path!r} as PEM ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _signature(paths: list[str]) -> tuple[FileSignature, ...]:
    return tuple(file_signature(path) for path in paths)


class ReloadingServerCredentials:
    """The server's certificate, key and client CA, re-read when their files change."""

    def __init__(
        self, cert_file: str, key_file: str, client_ca_file: str, check_seconds: float
    ) -> None:
        """Load the files now; raise TlsFilesError if they are unusable."""
        self._cert_file, self._key_file, self._ca_file = cert_file, key_file, client_ca_file
        self._paths = [path for path in (cert_file, key_file, client_ca_file) if path]
        self._check_seconds = check_seconds
        self._lock = threading.Lock()
        try:
            self._seen = _signature(self._paths)
        except OSError as error:
            raise TlsFilesError(f"cannot read the TLS files: {error}") from error
        self._initial = self._load()
        self._checked_at = time.monotonic()

    def credentials(self) -> grpc.ServerCredentials:
        """Return credentials for add_secure_port that call back here on every handshake."""
        # types-grpcio types the fetcher as never returning None, which grpc documents as
        # the "no change" answer.
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=bool(self._ca_file),
        )

    def _load(self) -> grpc.ServerCertificateConfiguration:
        try:
            chain = Path(self._cert_file).read_bytes()
            key_pem = Path(self._key_file).read_bytes()
            client_ca = Path(self._ca_file).read_bytes() if self._ca_file else None
            leaf = _PEM_PARSERS["certificates"](chain)[0]
            key = _PEM_PARSERS["private key"](key_pem)
            if client_ca is not None:
                _PEM_PARSERS["certificates"](client_ca)
        except (OSError, ValueError, TypeError, IndexError) as error:
            raise TlsFilesError(f"cannot load the TLS files: {_reason(error)}") from error
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        encoding = serialization.Encoding.DER
        if leaf.public_key().public_bytes(encoding, public) != key.public_key().public_bytes(
            encoding, public
        ):
            raise TlsFilesError("the TLS key does not belong to the certificate")
        _log.info(
            "TLS certificate loaded",
            extra={
                "subject": leaf.subject.rfc4514_string(),
                "serial": format(leaf.serial_number, "x"),
                "not_after": leaf.not_valid_after_utc.isoformat(),
            },
        )
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain)], root_certificates=client_ca
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Runs in a grpc thread during a handshake: it must never raise, and is cheap
        # (one clock read) except once per check interval.
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self._check_seconds:
                return None
            self._checked_at = now
            try:
                seen = _signature(self._paths)
                if seen == self._seen:
                    return None
                config = self._load()
            except (OSError, TlsFilesError) as error:
                # Half-rotated or unreadable: keep serving the previous pair, look again later.
                _log.warning("TLS files not reloaded, keeping the previous ones: %s", error)
                return None
            self._seen = seen
            return config
