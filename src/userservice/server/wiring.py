"""The one place Settings become components: each part takes its own small option type.

Nothing below the server package imports ``userservice.config``; this module reads the
settings and hands storage, the interceptors, the domain service and the key sources the
values they were built to take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from userservice.config import ConfigError, Settings, previous_secrets, replica_scan_limit
from userservice.domain.longrunning import OperationOptions
from userservice.domain.pagination import PageTokenCodec, page_token_codec
from userservice.domain.repository import UserRepository
from userservice.domain.scans import ScanGate
from userservice.interceptors.admission import AdmissionLimits, PublicStreamLimits
from userservice.interceptors.auth.keys import FileKeys, JwksUrlKeys, KeySource, StaticKeys
from userservice.interceptors.auth.verifier import TokenVerifier
from userservice.interceptors.chain import (
    ChainOptions,
    InterceptorChain,
    RateLimitOptions,
)
from userservice.interceptors.chain import build_chain as assemble_chain
from userservice.interceptors.matcher import MethodMatcher
from userservice.storage import migrate as migrate_store
from userservice.storage import open_repository as open_store
from userservice.storage.options import StoreOptions
from userservice.storage.sqlite.shared import SharedCommits

if TYPE_CHECKING:
    from userservice.observability.otel import Tracing

UNTRACED_METHODS: Final = ("grpc.health.v1.Health/*",)
"""Methods without a server span: probes every few seconds per pod would bury the real traces."""


def store_options(settings: Settings) -> StoreOptions:
    """Return how the configured store is opened."""
    return StoreOptions(
        migrate_on_start=settings.migrate_on_start,
        event_retention=settings.event_retention,
        request_id_retention_seconds=settings.request_id_retention_seconds,
        statement_timeout_seconds=settings.db_statement_timeout_seconds,
        sqlite_synchronous=settings.sqlite_synchronous,
        connect_timeout_seconds=settings.db_connect_timeout_seconds,
        migration_lock_timeout_seconds=settings.migration_lock_timeout_seconds,
        pool_min_size=settings.db_pool_min_size,
        pool_max_size=settings.db_pool_max_size,
    )


async def open_repository(
    url: str, *, settings: Settings | None = None, shared: SharedCommits | None = None
) -> UserRepository:
    """Open the store url names, as settings (the defaults if None) configure it.

    shared is set in a worker of `--workers N` on SQLite (see storage/sqlite/shared.py).
    """
    return await open_store(url, store_options(settings or Settings()), shared=shared)


def migrate(settings: Settings) -> list[str]:
    """Apply pending migrations to the configured store (blocking); return the names applied."""
    return migrate_store(settings.database_url, store_options(settings))


def codec(settings: Settings) -> PageTokenCodec:
    """Return the page-token codec: the current secret signs, the previous ones still verify."""
    return page_token_codec(settings.page_token_secret, previous_secrets(settings))


def operation_options(settings: Settings) -> OperationOptions:
    """Return how this replica runs long-running operations."""
    return OperationOptions(
        lease_seconds=settings.operation_lease_seconds,
        purge_batch_size=settings.purge_batch_size,
        purge_batch_interval_seconds=settings.purge_batch_interval_seconds,
    )


def scan_gate(settings: Settings) -> ScanGate:
    """Return the limits on substring scans, per principal and on this replica."""
    return ScanGate(settings.max_scans_per_principal, replica_scan_limit(settings))


def key_source_from_settings(settings: Settings) -> KeySource:
    """Return the (not yet started) key source for the configured secret, file or URL."""
    if settings.auth_jwt_secret:
        return StaticKeys(settings.auth_jwt_secret, "HS256")
    if settings.auth_jwt_public_key_file:
        return FileKeys(settings.auth_jwt_public_key_file, settings.reload_check_seconds)
    if settings.auth_jwks_url:
        return JwksUrlKeys(
            settings.auth_jwks_url,
            min_cache_seconds=settings.auth_jwks_min_cache_seconds,
            max_cache_seconds=settings.auth_jwks_max_cache_seconds,
            refetch_seconds=settings.auth_jwks_refetch_seconds,
            timeout_seconds=settings.auth_jwks_timeout_seconds,
        )
    raise ConfigError(
        "authentication is required: set USERSERVICE_AUTH_JWT_SECRET, "
        "USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE or USERSERVICE_AUTH_JWKS_URL"
    )


def verifier_from_settings(settings: Settings) -> TokenVerifier:
    """Build the verifier for the configured key source; start its keys before serving."""
    return TokenVerifier(
        key_source_from_settings(settings),
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        leeway=settings.auth_leeway_seconds,
        max_lifetime=settings.auth_max_token_lifetime_seconds,
    )


def chain_options(settings: Settings) -> ChainOptions:
    """Return the interceptor layers' limits; a rate_limit_rps of 0 leaves the limiter out."""
    rate_limit = None
    if settings.rate_limit_rps > 0:
        rate_limit = RateLimitOptions(
            settings.rate_limit_rps,
            settings.rate_limit_burst,
            redis_url=settings.rate_limit_redis_url,
            fail_open=settings.rate_limit_fail_open,
            redis_timeout_seconds=settings.rate_limit_redis_timeout_seconds,
        )
    return ChainOptions(
        admission=AdmissionLimits(
            settings.max_concurrent_rpcs,
            settings.max_open_streams,
            settings.max_streams_per_principal,
        ),
        public_streams=PublicStreamLimits(
            settings.max_public_streams, settings.max_public_streams_per_peer
        ),
        rate_limit=rate_limit,
    )


async def build_chain(settings: Settings, tracing: Tracing | None = None) -> InterceptorChain:
    """Build the interceptor chain settings describe, its keys started (KeyFetchError if none)."""
    layer = None if tracing is None else tracing.interceptor(MethodMatcher(UNTRACED_METHODS))
    return await assemble_chain(verifier_from_settings(settings), chain_options(settings), layer)
