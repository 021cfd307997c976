"""Service configuration: one Settings value built from flags and USERSERVICE_* variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from userservice.interceptors.auth import keys
from userservice.interceptors.auth.keys import KeySet
from userservice.storage import is_database_url, is_postgres_url
from userservice.tls import TlsFilesError, check_pem_file

ENV_PREFIX = "USERSERVICE_"
DEV_JWT_SECRET = "dev-secret-do-not-use-in-production-0123456789"  # noqa: S105


class ConfigError(ValueError):
    """Configuration is invalid; the message says which setting and why."""


def _setting(default: Any, help_text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting; the environment name is USERSERVICE_ plus the upper-cased field name."""

    listen_address: str = _setting("[::]:50051", "host:port the gRPC server binds")
    database_url: str = _setting(
        "sqlite:///var/userservice.db",
        "sqlite:///relative.db, sqlite:////absolute.db or postgresql://user@host/db",
    )
    reflection: bool = _setting(False, "serve grpc.reflection.v1 and v1alpha")
    shutdown_grace_seconds: float = _setting(10.0, "time in-flight RPCs get to finish")
    shutdown_drain_seconds: float = _setting(
        0.0, "wait after NOT_SERVING before refusing new RPCs (load balancers catch up)"
    )
    max_concurrent_rpcs: int = _setting(
        1000, "unary calls in progress at once; more are refused with RESOURCE_EXHAUSTED"
    )
    max_open_streams: int = _setting(1000, "streaming calls open at once on this replica")
    max_streams_per_principal: int = _setting(
        100, "streaming calls one principal (or one peer host without a token) may hold open"
    )
    max_scans_per_principal: int = _setting(
        2,
        "ListUsers/StreamUsers calls with a substring filter (a scan) one principal may have "
        "in progress at once",
    )
    max_scans: int = _setting(
        4,
        "scans in progress at once on this replica (all principals); on PostgreSQL at most "
        "db_pool_max_size - 1, so point reads and watchers keep a connection",
    )
    max_public_streams: int = _setting(
        500, "health Watch and reflection streams (no token) open at once on this replica"
    )
    max_public_streams_per_peer: int = _setting(
        20, "health Watch and reflection streams one peer host may hold open"
    )
    health_failures: int = _setting(
        3, "consecutive failed storage pings before health reports NOT_SERVING"
    )
    health_check_interval_seconds: float = _setting(1.0, "time between storage pings")
    max_message_bytes: int = _setting(4 * 1024 * 1024, "largest request or response message")
    metrics_address: str = _setting("", "host:port for Prometheus /metrics; empty disables")
    probe_address: str = _setting(
        "", "host:port of a plaintext listener serving only grpc.health.v1 (probes); empty disables"
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    dev: bool = _setting(False, "development run: allows the built-in development JWT secret")
    uvloop: bool = _setting(True, "run the event loop on uvloop")
    workers: int = _setting(
        1, "serving processes forked on one port (SO_REUSEPORT); keep 1 in Kubernetes"
    )
    migrate_on_start: bool = _setting(True, "apply pending schema migrations at start")
    page_token_secret: str = _setting(
        "",
        "HMAC key for page tokens; share it across replicas (random per process if empty, "
        "allowed on PostgreSQL only in development)",
    )
    page_token_previous_secrets: str = _setting(
        "", "comma-separated earlier page-token secrets, still accepted while a rotation rolls out"
    )
    db_pool_min_size: int = _setting(2, "PostgreSQL: connections kept open")
    db_pool_max_size: int = _setting(10, "PostgreSQL: most connections per process")
    db_connect_timeout_seconds: float = _setting(5.0, "PostgreSQL: connect timeout")
    db_statement_timeout_seconds: float = _setting(
        10.0,
        "statement budget: PostgreSQL's statement_timeout; SQLite interrupts a read or a "
        "write transaction past it",
    )
    sqlite_synchronous: str = _setting(
        "NORMAL",
        "SQLite: PRAGMA synchronous, NORMAL (a power loss can lose the last commits) or FULL",
    )
    migration_lock_timeout_seconds: float = _setting(
        10.0, "PostgreSQL: how long a migration waits for a table lock before it fails"
    )
    event_retention: int = _setting(100_000, "change events kept for WatchUsers resume")
    watch_progress_seconds: float = _setting(
        15.0, "an idle WatchUsers stream gets a progress message this often"
    )
    watch_buffer_events: int = _setting(
        1024, "live events buffered per watcher; a watcher further behind is ended to resume"
    )
    request_id_retention_seconds: float = _setting(
        86_400.0, "how long a CreateUser request_id is remembered for retries"
    )
    auth_jwt_secret: str = _setting("", "HS256 shared secret (at least 32 bytes)")
    auth_jwt_public_key_file: str = _setting(
        "", "PEM public key or JWKS file (RS256/ES256), re-read when it changes"
    )
    auth_jwks_url: str = _setting(
        "", "JWKS URL (https, or http to a loopback host) fetched and cached (RS256/ES256)"
    )
    auth_jwks_min_cache_seconds: float = _setting(
        60.0, "JWKS URL: shortest time a fetched key set is kept (floor for Cache-Control max-age)"
    )
    auth_jwks_max_cache_seconds: float = _setting(
        3600.0, "JWKS URL: longest time a fetched key set is kept (ceiling for max-age)"
    )
    auth_jwks_refetch_seconds: float = _setting(
        10.0, "JWKS URL: at most one refetch per this interval for tokens naming an unknown kid"
    )
    auth_jwks_timeout_seconds: float = _setting(5.0, "JWKS URL: timeout of one fetch")
    auth_issuer: str = _setting("", "required iss claim (required setting outside development)")
    auth_audience: str = _setting("", "required aud claim (required setting outside development)")
    auth_allow_any_issuer_audience: str = _setting(
        "", "the reason tokens need not name iss and aud; lets a non-development run omit them"
    )
    auth_leeway_seconds: float = _setting(30.0, "clock skew allowed for exp, nbf and iat")
    auth_max_token_lifetime_seconds: float = _setting(
        86_400.0, "longest accepted token lifetime (exp - iat, or exp - now without iat)"
    )
    reload_check_seconds: float = _setting(
        5.0, "how often the key/JWKS file and the TLS files are checked for changes"
    )
    tls_cert_file: str = _setting("", "server certificate chain (PEM); enables TLS")
    tls_key_file: str = _setting("", "server private key (PEM)")
    tls_client_ca_file: str = _setting("", "CA bundle for client certificates; enables mTLS")
    rate_limit_rps: float = _setting(200.0, "tokens per second per principal; 0 disables")
    rate_limit_burst: int = _setting(400, "bucket size per principal")
    rate_limit_redis_url: str = _setting("", "redis://host:port/db for a limit shared by replicas")
    rate_limit_fail_open: bool = _setting(True, "allow calls when Redis is unreachable")
    rate_limit_redis_timeout_seconds: float = _setting(
        0.1, "budget of one Redis round trip (connect included); a slower Redis counts as down"
    )

    def validate(self, *, require_auth: bool = True) -> Settings:
        """Return self, or raise ConfigError naming the first bad setting.

        require_auth is False only for commands that serve nothing (migrate).
        """
        _check_address("listen_address", self.listen_address)
        if self.metrics_address:
            _check_address("metrics_address", self.metrics_address)
        if self.probe_address:
            _check_address("probe_address", self.probe_address)
        if not is_database_url(self.database_url):
            raise ConfigError(
                "USERSERVICE_DATABASE_URL must start with sqlite:/// or postgresql://"
            )
        for name in (
            "shutdown_grace_seconds",
            "shutdown_drain_seconds",
            "auth_leeway_seconds",
            "auth_jwks_refetch_seconds",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_env_name(name)} must not be negative")
        positive = (
            "max_concurrent_rpcs",
            "max_open_streams",
            "max_streams_per_principal",
            "max_scans_per_principal",
            "max_scans",
            "max_public_streams",
            "max_public_streams_per_peer",
            "health_failures",
            "health_check_interval_seconds",
            "max_message_bytes",
            "workers",
            "db_pool_max_size",
            "db_connect_timeout_seconds",
            "db_statement_timeout_seconds",
            "migration_lock_timeout_seconds",
            "event_retention",
            "request_id_retention_seconds",
            "watch_progress_seconds",
            "watch_buffer_events",
            "auth_jwks_min_cache_seconds",
            "auth_jwks_timeout_seconds",
            "auth_max_token_lifetime_seconds",
            "reload_check_seconds",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)} must be positive")
        port = self.listen_address.rpartition(":")[2]
        if self.workers > 1 and (not port.isdigit() or int(port) == 0):
            raise ConfigError("USERSERVICE_WORKERS above 1 needs a fixed port to share")
        if self.max_public_streams_per_peer > self.max_public_streams:
            raise ConfigError(
                "USERSERVICE_MAX_PUBLIC_STREAMS_PER_PEER must not be above "
                "USERSERVICE_MAX_PUBLIC_STREAMS"
            )
        if self.probe_address and self.workers > 1:
            # Each worker would answer for itself on a shared port: a probe would see only one.
            raise ConfigError(
                "USERSERVICE_PROBE_ADDRESS needs USERSERVICE_WORKERS=1 (a probe answered by one "
                "worker says nothing of the others)"
            )
        if not 0 <= self.db_pool_min_size <= self.db_pool_max_size:
            raise ConfigError("USERSERVICE_DB_POOL_MIN_SIZE must be between 0 and the max size")
        if self.sqlite_synchronous.upper() not in {"NORMAL", "FULL"}:
            raise ConfigError("USERSERVICE_SQLITE_SYNCHRONOUS must be NORMAL or FULL")
        if self.max_scans_per_principal > self.max_scans:
            raise ConfigError(
                "USERSERVICE_MAX_SCANS_PER_PRINCIPAL must not exceed USERSERVICE_MAX_SCANS"
            )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError("USERSERVICE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if self.rate_limit_rps < 0 or (self.rate_limit_rps > 0 and self.rate_limit_burst < 1):
            raise ConfigError("USERSERVICE_RATE_LIMIT_RPS must be >= 0 and the burst >= 1")
        if self.rate_limit_redis_timeout_seconds <= 0:
            raise ConfigError("USERSERVICE_RATE_LIMIT_REDIS_TIMEOUT_SECONDS must be above 0")
        key_sources = [self.auth_jwt_secret, self.auth_jwt_public_key_file, self.auth_jwks_url]
        if sum(map(bool, key_sources)) > 1:
            raise ConfigError(
                "set only one of USERSERVICE_AUTH_JWT_SECRET, "
                "USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE and USERSERVICE_AUTH_JWKS_URL"
            )
        if require_auth and not any(key_sources):
            raise ConfigError(
                "authentication is required: set USERSERVICE_AUTH_JWT_SECRET, "
                "USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE or USERSERVICE_AUTH_JWKS_URL "
                "(make run uses a development secret)"
            )
        if self.auth_jwks_max_cache_seconds < self.auth_jwks_min_cache_seconds:
            raise ConfigError(
                "USERSERVICE_AUTH_JWKS_MAX_CACHE_SECONDS must not be below the minimum"
            )
        if self.auth_jwks_url:
            _check_jwks_url(self.auth_jwks_url, allow_plain_http=self.dev)
        if (
            require_auth
            and not self.dev
            and not (self.auth_issuer and self.auth_audience)
            and not self.auth_allow_any_issuer_audience.strip()
        ):
            raise ConfigError(
                "USERSERVICE_AUTH_ISSUER and USERSERVICE_AUTH_AUDIENCE are required outside "
                "development (a token minted for another service must not be accepted here); "
                "set both, or set USERSERVICE_AUTH_ALLOW_ANY_ISSUER_AUDIENCE to the reason"
            )
        if self.page_token_previous_secrets.strip() and not self.page_token_secret:
            raise ConfigError(
                "USERSERVICE_PAGE_TOKEN_PREVIOUS_SECRETS needs USERSERVICE_PAGE_TOKEN_SECRET "
                "(the current secret, which signs new tokens)"
            )
        if (
            require_auth
            and not self.dev
            and not self.page_token_secret
            and is_postgres_url(self.database_url)
        ):
            raise ConfigError(
                "USERSERVICE_PAGE_TOKEN_SECRET is required on PostgreSQL outside development: "
                "replicas with random per-process keys reject each other's page tokens"
            )
        if self.auth_jwt_secret == DEV_JWT_SECRET and not self.dev:
            raise ConfigError(
                "refusing to start with the development JWT secret; set a real "
                "USERSERVICE_AUTH_JWT_SECRET, or --dev / USERSERVICE_DEV=true for a development run"
            )
        if self.auth_jwt_secret and len(self.auth_jwt_secret.encode()) < 32:
            raise ConfigError("USERSERVICE_AUTH_JWT_SECRET must be at least 32 bytes")
        for name in (
            "auth_jwt_public_key_file",
            "tls_cert_file",
            "tls_key_file",
            "tls_client_ca_file",
        ):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{_env_name(name)}: no such file {path!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("USERSERVICE_TLS_CERT_FILE and USERSERVICE_TLS_KEY_FILE go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError(
                "USERSERVICE_TLS_CLIENT_CA_FILE (mTLS) needs TLS: set the cert and key"
            )
        self._parse_files()
        return self

    def _parse_files(self) -> None:
        """Parse the key, JWKS and TLS files now, so a bad one is a configuration error."""
        if self.auth_jwt_public_key_file:
            load_key_file(self.auth_jwt_public_key_file)
        if not self.tls_cert_file:
            return
        pem_files = [
            ("tls_cert_file", "certificates"),
            ("tls_key_file", "private key"),
            ("tls_client_ca_file", "certificates"),
        ]
        for name, kind in pem_files:
            path = getattr(self, name)
            if not path:
                continue
            try:
                check_pem_file(path, kind)
            except TlsFilesError as error:
                raise ConfigError(f"{_env_name(name)}: {error}") from None


def load_key_file(path: str) -> KeySet:
    """Load the USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE key set, or raise ConfigError naming it."""
    try:
        return keys.load_key_file(path)
    except keys.KeyFileError as error:
        raise ConfigError(f"{_env_name('auth_jwt_public_key_file')}: {error}") from error


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _check_address(name: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{_env_name(name)} must be host:port, got {address!r}")


def _check_jwks_url(url: str, *, allow_plain_http: bool) -> None:
    # Plain http would let anyone on the path substitute their own signing keys.
    parsed = urllib.parse.urlsplit(url)
    loopback = parsed.hostname in {"127.0.0.1", "::1", "localhost"}
    if parsed.scheme == "https" and parsed.hostname:
        return
    if parsed.scheme == "http" and parsed.hostname and (loopback or allow_plain_http):
        return
    raise ConfigError(
        "USERSERVICE_AUTH_JWKS_URL must be an https:// URL "
        "(http:// only to a loopback host or in development)"
    )


def replica_scan_limit(settings: Settings) -> int:
    """Return how many scans this replica runs at once: max_scans, below the pool on PostgreSQL.

    Scans beyond it would hold every pool connection, and point reads and the change feed
    would wait behind them; with a pool of one there is nothing to keep back.
    """
    if is_postgres_url(settings.database_url):
        return max(1, min(settings.max_scans, settings.db_pool_max_size - 1))
    return settings.max_scans


def previous_secrets(settings: Settings) -> list[str]:
    """Return the earlier page-token secrets, in the order configured."""
    parts = settings.page_token_previous_secrets.split(",")
    return [part.strip() for part in parts if part.strip()]


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{_env_name(name)} must be true or false, got {raw!r}")


def _convert(name: str, kind: Any, raw: str) -> Any:
    if kind in (bool, "bool"):
        return _parse_bool(name, raw)
    converter = {"int": int, "float": float, "str": str}.get(str(kind), kind)
    try:
        return converter(raw)
    except ValueError:
        raise ConfigError(
            f"{_env_name(name)}: {raw!r} is not a valid {converter.__name__}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per setting; flags win over the environment."""
    for item in fields(Settings):
        flag = "--" + item.name.replace("_", "-")
        help_text = (
            f"{item.metadata['help']} (env {_env_name(item.name)}, default {item.default!r})"
        )
        parser.add_argument(flag, dest=item.name, default=None, metavar="VALUE", help=help_text)


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_auth: bool = True,
) -> Settings:
    """Build and validate Settings: defaults, then environment, then explicit overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in fields(Settings):
        raw = environ.get(_env_name(item.name))
        if raw is not None:
            values[item.name] = _convert(item.name, item.type, raw)
        override = (overrides or {}).get(item.name)
        if override is not None:
            values[item.name] = (
                _convert(item.name, item.type, override) if isinstance(override, str) else override
            )
    return dataclasses.replace(Settings(), **values).validate(require_auth=require_auth)


def setting_names() -> Sequence[str]:
    """Return every environment variable name the service reads."""
    return [_env_name(item.name) for item in fields(Settings)]
