"""Prometheus metrics for RPCs, and the HTTP server that exposes them on /metrics.

Names and labels follow go-grpc-prometheus, so the usual gRPC dashboards work unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Histogram, start_http_server

_METHOD_LABELS: Final = ("grpc_type", "grpc_service", "grpc_method")

HANDLED: Final = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by final status code.",
    [*_METHOD_LABELS, "grpc_code"],
)
HANDLING_SECONDS: Final = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its final status, in seconds.",
    _METHOD_LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MSG_RECEIVED: Final = Counter(
    "grpc_server_msg_received_total", "Stream messages received from clients.", _METHOD_LABELS
)
MSG_SENT: Final = Counter(
    "grpc_server_msg_sent_total", "Stream messages sent to clients.", _METHOD_LABELS
)
MALFORMED_REQUESTS: Final = Counter(
    "userservice_malformed_requests_total",
    "Request messages that did not parse (answered INVALID_ARGUMENT, MALFORMED_REQUEST).",
    ["grpc_service", "grpc_method"],
)
ACCESS_LOG_ERRORS: Final = Counter(
    "userservice_access_log_errors_total", "Access log lines or metrics lost to an error."
)


class MethodMetrics:
    """The metric series of one method, resolved once: a call costs a few increments."""

    def __init__(self, method: str, kind: str) -> None:
        """Bind the series for a full method name (/package.Service/Method) and RPC kind."""
        service, _, name = method.lstrip("/").partition("/")
        self._labels = (kind, service, name)
        self._handled: dict[grpc.StatusCode, Counter] = {}
        self._seconds = HANDLING_SECONDS.labels(*self._labels)
        self._received = MSG_RECEIVED.labels(*self._labels)
        self._sent = MSG_SENT.labels(*self._labels)

    def record(self, code: grpc.StatusCode, seconds: float, received: int, sent: int) -> None:
        """Count one completed RPC; received and sent are stream message counts (0 for unary)."""
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = HANDLED.labels(*self._labels, code.name)
        handled.inc()
        self._seconds.observe(seconds)
        if received:
            self._received.inc(received)
        if sent:
            self._sent.inc(sent)


@dataclass(frozen=True)
class MetricsServer:
    """A running /metrics endpoint on its own thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """Return the bound port (the real one when port 0 was asked for)."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_metrics_server(address: str) -> MetricsServer:
    """Serve the default registry on http://address/metrics (host:port; [::]:0 works)."""
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")  # noqa: S104
    return MetricsServer(server, thread)
