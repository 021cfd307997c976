"""Prometheus metrics for RPCs and the service, and the HTTP server that exposes them on /metrics.

RPC metric names *and label values* follow go-grpc-prometheus (grpc-ecosystem), so the usual
gRPC dashboards and alerts work unchanged: ``grpc_code`` is spelled as Go spells it (``NotFound``,
not Python's ``NOT_FOUND``) and unary calls count one message received and, when they succeed,
one sent. The service's own metrics are ``userservice_*``.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

import userservice

_METHOD_LABELS: Final = ("grpc_type", "grpc_service", "grpc_method")

GO_CODE_NAMES: Final[dict[grpc.StatusCode, str]] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
"""grpc_code label values: the names of Go's codes.Code (codes.Code.String())."""

STARTED: Final = Counter("grpc_server_started_total", "RPCs started on the server.", _METHOD_LABELS)
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
    "grpc_server_msg_received_total", "Messages received from clients.", _METHOD_LABELS
)
MSG_SENT: Final = Counter("grpc_server_msg_sent_total", "Messages sent to clients.", _METHOD_LABELS)
OPEN_STREAMS: Final = Gauge(
    "userservice_open_streams", "Streaming RPCs in progress on this replica.", _METHOD_LABELS
)
REFUSALS: Final = Counter(
    "userservice_refusals_total",
    "Calls refused by auth, admission or the rate limit, by ErrorInfo reason.",
    ["reason"],
)
STORAGE_SECONDS: Final = Histogram(
    "userservice_storage_seconds",
    "Time of one storage operation (a UserRepository method), in seconds.",
    ["operation"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5),
)
HEALTH_STATUS: Final = Gauge(
    "userservice_health_status",
    "1 while grpc.health.v1 reports SERVING for the service ('' is the whole server), else 0.",
    ["grpc_service"],
)
BUILD: Final = Info("userservice_build", "The running build: versions of the service and runtime.")
MALFORMED_REQUESTS: Final = Counter(
    "userservice_malformed_requests_total",
    "Request messages that did not parse (answered INVALID_ARGUMENT, MALFORMED_REQUEST).",
    ["grpc_service", "grpc_method"],
)
ACCESS_LOG_ERRORS: Final = Counter(
    "userservice_access_log_errors_total", "Access log lines or metrics lost to an error."
)


def publish_build_info() -> None:
    """Set userservice_build_info{version, python_version, grpc_version} (value 1)."""
    BUILD.info(
        {
            "version": userservice.__version__,
            "python_version": platform.python_version(),
            "grpc_version": grpc.__version__,
        }
    )


def publish_health(service: str, serving: Callable[[], bool]) -> None:
    """Report serving() as userservice_health_status{grpc_service}, read at every scrape."""
    HEALTH_STATUS.labels(service).set_function(lambda: 1.0 if serving() else 0.0)


class MethodMetrics:
    """The metric series of one method, resolved once: a call costs a few increments."""

    def __init__(self, method: str, kind: str) -> None:
        """Bind the series for a full method name (/package.Service/Method) and RPC kind."""
        service, _, name = method.lstrip("/").partition("/")
        self._labels = (kind, service, name)
        self._handled: dict[grpc.StatusCode, Counter] = {}
        self.started = STARTED.labels(*self._labels)
        self.seconds = HANDLING_SECONDS.labels(*self._labels)
        self.received = MSG_RECEIVED.labels(*self._labels)
        self.sent = MSG_SENT.labels(*self._labels)
        self.open_streams = OPEN_STREAMS.labels(*self._labels)

    def handled(self, code: grpc.StatusCode) -> Counter:
        """Return the grpc_server_handled_total series of code (resolved on its first use)."""
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = HANDLED.labels(*self._labels, GO_CODE_NAMES[code])
        return handled


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
