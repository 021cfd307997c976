"""The channel's gRPC service config and arguments: balancing, health, retries, keepalive.

Retries live in the service config so grpc core runs them (with its backoff, jitter and
retry throttling) per method. Which methods retry UNAVAILABLE is read from the proto
(``userservice.policy``): those whose ``idempotency_level`` is NO_SIDE_EFFECTS or
IDEMPOTENT, and those whose ``method_policy`` names an ``idempotency_key`` this client
always fills (CreateUser's request_id, which makes a replayed create return the first
result). UpdateUser and DeleteUser have no retry policy here: a service config cannot look
into the request, and a write is safe to replay only with an etag, so the client retries
those itself when they carry one. RESOURCE_EXHAUSTED is never retried by grpc core (it does
not read google.rpc.RetryInfo); the client waits the RetryInfo delay itself.
"""

from __future__ import annotations

import json
from typing import Any

from userservice.policy import METHODS, SERVICE_NAME

SERVICE = SERVICE_NAME
RETRIED_METHODS = tuple(policy.name for policy in METHODS.values() if policy.retryable)
NOT_RETRIED_METHODS = tuple(policy.name for policy in METHODS.values() if not policy.retryable)


def _names(retryable: bool) -> list[dict[str, str]]:
    """Return the service config names of the methods (both services') that retry or not."""
    return [
        {"service": policy.path.split("/")[1], "method": policy.name}
        for policy in METHODS.values()
        if policy.retryable == retryable
    ]


# grpc core caps maxAttempts at 5.
MAX_ATTEMPTS = 5


def service_config(*, health_check: bool = True) -> dict[str, Any]:
    """Return the service config: round_robin, health checking, per-method retry policies."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": _names(retryable=True),
                "retryPolicy": {
                    "maxAttempts": MAX_ATTEMPTS,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            {"name": _names(retryable=False)},
        ],
        # A fleet-wide outage must not turn every client into a retry storm: retries stop
        # when more than half of the recent calls failed (A6 retry throttling).
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    if health_check:
        # A17 client-side health checking: a replica whose grpc.health.v1 status for the
        # service turns NOT_SERVING (its drain at shutdown, a lost database) leaves the
        # round_robin rotation until it reports SERVING again.
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return config


def channel_options(
    *, health_check: bool = True, max_message_bytes: int = 4 * 1024 * 1024
) -> list[tuple[str, Any]]:
    """Return the channel arguments matching the server's (see server.channel_options)."""
    return [
        ("grpc.service_config", json.dumps(service_config(health_check=health_check))),
        ("grpc.enable_retries", 1),
        # The server accepts a ping every 10 s at most (two strikes, then GOAWAY): ping
        # every 30 s, well above that, to find dead connections behind NATs.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Come back quickly to a replica that restarted (the default backoff reaches 120 s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.dns_min_time_between_resolutions_ms", 1_000),
    ]
