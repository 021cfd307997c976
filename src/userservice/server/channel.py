"""The gRPC server's channel arguments, its TLS credentials and binding its listeners."""

from __future__ import annotations

import logging
from typing import Any, Final

import grpc

from userservice.config import Settings
from userservice.server.errors import StartupError
from userservice.tls import ReloadingServerCredentials, TlsFilesError

log = logging.getLogger("userservice.server")

# A health request is a service name; a response, a status (List: a few of them).
PROBE_MESSAGE_BYTES: Final = 64 * 1024


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Return the server channel arguments; docs/configuration.md explains each choice."""
    return [
        # A second server on a taken port must fail, not silently share it; only the
        # workers of one parent share theirs (the parent checked that it was free).
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", 256),
        # Calls grpc has taken but grpc.aio has not yet handed to the chain (it asks for one at
        # a time, and none past the backstop) wait in a backlog, which grpc sheds at random past
        # 1000 and entirely past 3000 by default: CANCELLED, unlogged, uncounted, health checks
        # too. Sized like the backstop, a burst (10,000 health Watches) reaches our admission
        # layers, which refuse it logged and counted.
        ("grpc.server.max_pending_requests", grpc_backstop(settings)),
        ("grpc.server.max_pending_requests_hard_limit", grpc_backstop(settings)),
        # Detect dead peers behind NATs and load balancers.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keepalive enforcement: clients may ping at most every 10 s, and get
        # GOAWAY(too_many_pings) after two strikes instead of draining the CPU.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Recycle connections so clients rebalance across replicas (L4 balancers
        # pin an HTTP/2 connection to one pod for its lifetime).
        ("grpc.max_connection_idle_ms", 5 * 60_000),
        ("grpc.max_connection_age_ms", 30 * 60_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]


def probe_channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Return the probe listener's channel arguments: the server's, unshared, small messages."""
    own = {
        "grpc.so_reuseport": 0,
        "grpc.max_receive_message_length": PROBE_MESSAGE_BYTES,
        "grpc.max_send_message_length": PROBE_MESSAGE_BYTES,
    }
    return [(name, own.get(name, value)) for name, value in channel_options(settings)]


def grpc_backstop(settings: Settings) -> int:
    """Return grpc's own concurrency limit: far above the admission layers', a last resort.

    grpc refuses calls over it before any interceptor runs, health checks included, so it
    must never be the limit that bites; it only bounds memory if admission itself is flooded.
    Every limit of ours counts: unary calls, streams, and public (health, reflection) streams.
    """
    ours = settings.max_concurrent_rpcs + settings.max_open_streams + settings.max_public_streams
    return 4 * ours + 1000


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Return TLS credentials that follow their files, or None for plaintext (no cert)."""
    if not settings.tls_cert_file:
        return None
    try:
        reloading = ReloadingServerCredentials(
            settings.tls_cert_file,
            settings.tls_key_file,
            settings.tls_client_ca_file,
            settings.reload_check_seconds,
        )
    except TlsFilesError as error:
        raise StartupError(str(error)) from error
    return reloading.credentials()


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind address (with TLS when credentials are given); return the port or raise StartupError."""
    port = 0
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        log.debug("bind failed", exc_info=error)
    if port == 0:
        raise StartupError(f"cannot listen on {address} (in use or invalid)")
    return port
