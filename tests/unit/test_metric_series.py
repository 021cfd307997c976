"""The lock-free RPC series expose exactly what prometheus_client's own classes would."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from userservice.metrics import (
    GO_CODE_NAMES,
    HANDLING_BUCKETS,
    STORAGE_BUCKETS,
    RpcCollector,
)

LABELS = ("grpc_type", "grpc_service", "grpc_method")
GET = ("unary", "user.v1.UserService", "GetUser")
# On a bound, between bounds, past the last: le is "less than or equal".
DURATIONS = (0.0005, 0.0004, 0.3, 20.0)


def _without_created(text: bytes) -> list[str]:
    """The exposition's lines but the _created timestamps, which differ by construction."""
    return [
        line.partition("} ")[0] if "_created{" in line else line
        for line in text.decode().splitlines()
    ]


def _reference() -> CollectorRegistry:
    """The same updates made through prometheus_client's Counter, Gauge and Histogram."""
    registry = CollectorRegistry()
    started = Counter("grpc_server_started_total", "RPCs started on the server.", LABELS,
                      registry=registry)  # fmt: skip
    handled = Counter(
        "grpc_server_handled_total",
        "RPCs completed on the server, by final status code.",
        [*LABELS, "grpc_code"],
        registry=registry,
    )
    seconds = Histogram(
        "grpc_server_handling_seconds",
        "Time from the start of an RPC to its final status, in seconds.",
        LABELS,
        buckets=HANDLING_BUCKETS,
        registry=registry,
    )
    received = Counter("grpc_server_msg_received_total", "Messages received from clients.",
                       LABELS, registry=registry)  # fmt: skip
    sent = Counter("grpc_server_msg_sent_total", "Messages sent to clients.", LABELS,
                   registry=registry)  # fmt: skip
    open_streams = Gauge("userservice_open_streams", "Streaming RPCs in progress on this replica.",
                         LABELS, registry=registry)  # fmt: skip
    storage = Histogram(
        "userservice_storage_seconds",
        "Time of one storage operation (a UserRepository method), in seconds.",
        ["operation"],
        buckets=STORAGE_BUCKETS,
        registry=registry,
    )
    started.labels(*GET).inc(4)
    received.labels(*GET).inc(4)
    sent.labels(*GET).inc(3)
    handled.labels(*GET, GO_CODE_NAMES[grpc.StatusCode.OK]).inc(3)
    handled.labels(*GET, GO_CODE_NAMES[grpc.StatusCode.NOT_FOUND]).inc()
    for duration in DURATIONS:
        seconds.labels(*GET).observe(duration)
    open_streams.labels(*GET)
    storage.labels("get").observe(0.0001)
    storage.labels("get").observe(0.002)
    storage.labels("create")
    return registry


def test_exposition_matches_prometheus_client() -> None:
    collector = RpcCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    metrics = collector.method("/user.v1.UserService/GetUser", "unary")
    assert collector.method("/user.v1.UserService/GetUser", "unary") is metrics
    for code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK):
        metrics.started += 1
        metrics.received += 1
        metrics.handle(code)
    metrics.started += 1
    metrics.received += 1
    metrics.handle(grpc.StatusCode.OK)
    metrics.sent += 3
    for duration in DURATIONS:
        metrics.seconds.observe(duration)
    collector.storage_series("get").observe(0.0001)
    collector.storage_series("get").observe(0.002)
    collector.storage_series("create")

    ours = _without_created(generate_latest(registry))
    theirs = _without_created(generate_latest(_reference()))
    assert sorted(ours) == sorted(theirs)
    on_the_bound = (
        'grpc_server_handling_seconds_bucket{grpc_method="GetUser",'
        'grpc_service="user.v1.UserService",grpc_type="unary",le="0.0005"} 2.0'
    )
    assert on_the_bound in ours
