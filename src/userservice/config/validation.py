"""The rules a Settings value must keep, checked once at start-up: each names its setting."""

from __future__ import annotations

import os
import urllib.parse

from userservice.config.settings import DEV_JWT_SECRET, ConfigError, Settings, env_name
from userservice.interceptors.auth import keys
from userservice.interceptors.auth.keys import KeySet
from userservice.storage import is_database_url, is_postgres_url
from userservice.tls import TlsFilesError, check_pem_file


def validate_settings(settings: Settings, *, require_auth: bool = True) -> None:
    """Raise ConfigError naming the first bad setting.

    require_auth is False only for commands that serve nothing (migrate).
    """
    _check_address("listen_address", settings.listen_address)
    if settings.metrics_address:
        _check_address("metrics_address", settings.metrics_address)
    if settings.probe_address:
        _check_address("probe_address", settings.probe_address)
    if not is_database_url(settings.database_url):
        raise ConfigError("USERSERVICE_DATABASE_URL must start with sqlite:/// or postgresql://")
    for name in (
        "shutdown_grace_seconds",
        "shutdown_drain_seconds",
        "auth_leeway_seconds",
        "auth_jwks_refetch_seconds",
    ):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{env_name(name)} must not be negative")
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
        "operation_lease_seconds",
        "purge_batch_size",
        "auth_jwks_min_cache_seconds",
        "auth_jwks_timeout_seconds",
        "auth_max_token_lifetime_seconds",
        "reload_check_seconds",
    )
    for name in positive:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{env_name(name)} must be positive")
    port = settings.listen_address.rpartition(":")[2]
    if settings.workers > 1 and (not port.isdigit() or int(port) == 0):
        raise ConfigError("USERSERVICE_WORKERS above 1 needs a fixed port to share")
    if settings.max_public_streams_per_peer > settings.max_public_streams:
        raise ConfigError(
            "USERSERVICE_MAX_PUBLIC_STREAMS_PER_PEER must not be above "
            "USERSERVICE_MAX_PUBLIC_STREAMS"
        )
    if settings.probe_address and settings.workers > 1:
        # Each worker would answer for itself on a shared port: a probe would see only one.
        raise ConfigError(
            "USERSERVICE_PROBE_ADDRESS needs USERSERVICE_WORKERS=1 (a probe answered by one "
            "worker says nothing of the others)"
        )
    if settings.purge_batch_interval_seconds < 0:
        raise ConfigError("USERSERVICE_PURGE_BATCH_INTERVAL_SECONDS must not be negative")
    if settings.purge_batch_interval_seconds >= settings.operation_lease_seconds:
        # A runner renews its lease once per batch: a longer pause would lose it.
        raise ConfigError(
            "USERSERVICE_PURGE_BATCH_INTERVAL_SECONDS must be below "
            "USERSERVICE_OPERATION_LEASE_SECONDS"
        )
    if not 0 <= settings.db_pool_min_size <= settings.db_pool_max_size:
        raise ConfigError("USERSERVICE_DB_POOL_MIN_SIZE must be between 0 and the max size")
    if settings.sqlite_synchronous.upper() not in {"NORMAL", "FULL"}:
        raise ConfigError("USERSERVICE_SQLITE_SYNCHRONOUS must be NORMAL or FULL")
    if settings.max_scans_per_principal > settings.max_scans:
        raise ConfigError(
            "USERSERVICE_MAX_SCANS_PER_PRINCIPAL must not exceed USERSERVICE_MAX_SCANS"
        )
    if settings.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("USERSERVICE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    if settings.rate_limit_rps < 0 or (
        settings.rate_limit_rps > 0 and settings.rate_limit_burst < 1
    ):
        raise ConfigError("USERSERVICE_RATE_LIMIT_RPS must be >= 0 and the burst >= 1")
    if settings.rate_limit_redis_timeout_seconds <= 0:
        raise ConfigError("USERSERVICE_RATE_LIMIT_REDIS_TIMEOUT_SECONDS must be above 0")
    key_sources = [
        settings.auth_jwt_secret,
        settings.auth_jwt_public_key_file,
        settings.auth_jwks_url,
    ]
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
    if settings.auth_jwks_max_cache_seconds < settings.auth_jwks_min_cache_seconds:
        raise ConfigError("USERSERVICE_AUTH_JWKS_MAX_CACHE_SECONDS must not be below the minimum")
    if settings.auth_jwks_url:
        _check_jwks_url(settings.auth_jwks_url, allow_plain_http=settings.dev)
    if (
        require_auth
        and not settings.dev
        and not (settings.auth_issuer and settings.auth_audience)
        and not settings.auth_allow_any_issuer_audience.strip()
    ):
        raise ConfigError(
            "USERSERVICE_AUTH_ISSUER and USERSERVICE_AUTH_AUDIENCE are required outside "
            "development (a token minted for another service must not be accepted here); "
            "set both, or set USERSERVICE_AUTH_ALLOW_ANY_ISSUER_AUDIENCE to the reason"
        )
    if settings.page_token_previous_secrets.strip() and not settings.page_token_secret:
        raise ConfigError(
            "USERSERVICE_PAGE_TOKEN_PREVIOUS_SECRETS needs USERSERVICE_PAGE_TOKEN_SECRET "
            "(the current secret, which signs new tokens)"
        )
    if (
        require_auth
        and not settings.dev
        and not settings.page_token_secret
        and is_postgres_url(settings.database_url)
    ):
        raise ConfigError(
            "USERSERVICE_PAGE_TOKEN_SECRET is required on PostgreSQL outside development: "
            "replicas with random per-process keys reject each other's page tokens"
        )
    if settings.auth_jwt_secret == DEV_JWT_SECRET and not settings.dev:
        raise ConfigError(
            "refusing to start with the development JWT secret; set a real "
            "USERSERVICE_AUTH_JWT_SECRET, or --dev / USERSERVICE_DEV=true for a development run"
        )
    if settings.auth_jwt_secret and len(settings.auth_jwt_secret.encode()) < 32:
        raise ConfigError("USERSERVICE_AUTH_JWT_SECRET must be at least 32 bytes")
    for name in (
        "auth_jwt_public_key_file",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
    ):
        path = getattr(settings, name)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{env_name(name)}: no such file {path!r}")
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ConfigError("USERSERVICE_TLS_CERT_FILE and USERSERVICE_TLS_KEY_FILE go together")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ConfigError("USERSERVICE_TLS_CLIENT_CA_FILE (mTLS) needs TLS: set the cert and key")
    _parse_files(settings)


def _parse_files(settings: Settings) -> None:
    """Parse the key, JWKS and TLS files now, so a bad one is a configuration error."""
    if settings.auth_jwt_public_key_file:
        load_key_file(settings.auth_jwt_public_key_file)
    if not settings.tls_cert_file:
        return
    pem_files = [
        ("tls_cert_file", "certificates"),
        ("tls_key_file", "private key"),
        ("tls_client_ca_file", "certificates"),
    ]
    for name, kind in pem_files:
        path = getattr(settings, name)
        if not path:
            continue
        try:
            check_pem_file(path, kind)
        except TlsFilesError as error:
            raise ConfigError(f"{env_name(name)}: {error}") from None


def load_key_file(path: str) -> KeySet:
    """Load the USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE key set, or raise ConfigError naming it."""
    try:
        return keys.load_key_file(path)
    except keys.KeyFileError as error:
        raise ConfigError(f"{env_name('auth_jwt_public_key_file')}: {error}") from error


def _check_address(name: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{env_name(name)} must be host:port, got {address!r}")


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
