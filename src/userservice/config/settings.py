"""The settings: every one, its default and its help, and the rules derived from a few."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from userservice.storage import is_postgres_url

ENV_PREFIX = "USERSERVICE_"
DEV_JWT_SECRET = "dev-secret-do-not-use-in-production-0123456789"  # noqa: S105


class ConfigError(ValueError):
    """Configuration is invalid; the message says which setting and why."""


def env_name(field_name: str) -> str:
    """Return the environment variable of a setting: USERSERVICE_ plus its upper-cased name."""
    return ENV_PREFIX + field_name.upper()


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
        1024,
        "recent events kept in memory, shared by all watchers; one further behind reads the store",
    )
    request_id_retention_seconds: float = _setting(
        86_400.0, "how long a CreateUser request_id is remembered for retries"
    )
    operation_lease_seconds: float = _setting(
        30.0,
        "a long-running operation's lease: another replica resumes it this long after its"
        " runner stopped renewing",
    )
    purge_batch_size: int = _setting(100, "users PurgeUsers deletes per transaction")
    purge_batch_interval_seconds: float = _setting(
        0.0, "pause between PurgeUsers batches, leaving the store to other calls"
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
        # Imported here: the rules (validation.py) take a Settings, so they import this module.
        from userservice.config.validation import validate_settings

        validate_settings(self, require_auth=require_auth)
        return self


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
