"""Prometheus metrics for RPCs and the service, and the HTTP server that exposes them on /metrics.

RPC metric names *and label values* follow go-grpc-prometheus (grpc-ecosystem), so the usual
gRPC dashboards and alerts work unchanged: ``grpc_code`` is spelled as Go spells it (``NotFound``,
not Python's ``NOT_FOUND``) and unary calls count one message received and, when they succeed,
one sent. The service's own metrics are ``userservice_*``.
"""

from __future__ import annotations

import bisect
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, cast
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Info, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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

HANDLING_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
STORAGE_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5,
)  # fmt: skip
# As prometheus_client decides whether its own counters and histograms expose _created.
# prometheus_client's own spelling of an le bound (untyped there, hence the cast).
_le: Final = cast(Callable[[float], str], floatToGoString)
_DISABLE_CREATED: Final = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False")
_CREATED_SERIES: Final = _DISABLE_CREATED.lower() not in ("true", "1", "t")


class HistogramSeries:
    """One histogram series as a bucket array: observe() is a bisect and two additions.

    Written only by the event-loop thread, so without a lock; read by the scrape thread,
    which takes the count from the buckets, so _count always equals the +Inf bucket.
    """

    __slots__ = ("_bounds", "counts", "created", "labels", "sum")

    def __init__(self, labels: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        """Start an empty series with these label values and upper bounds (+Inf added)."""
        self.labels = labels
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        """Count value in the first bucket whose upper bound is at least value."""
        # bisect_left: the first bound >= value, as prometheus_client's le comparison.
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class MethodMetrics:
    """The RPC series of one method: plain fields the access log layer updates per call.

    go-grpc-prometheus' started, handled, messages, handling time and the open streams,
    kept as ints and a bucket array rather than prometheus_client children, each of whose
    updates takes a lock: a unary call made six such updates. Only the event-loop thread
    writes them; RpcCollector reads them when /metrics is scraped. Get them from
    ``method_metrics``, which hands every server of the process the same series.
    """

    __slots__ = (
        "created",
        "handled",
        "handled_created",
        "labels",
        "open_streams",
        "received",
        "seconds",
        "sent",
        "started",
    )

    def __init__(self, labels: tuple[str, str, str]) -> None:
        """Start the series of (grpc_type, grpc_service, grpc_method) at zero."""
        self.labels = labels
        self.created = time.time()
        self.started = 0
        self.received = 0
        self.sent = 0
        self.open_streams = 0
        self.handled: dict[grpc.StatusCode, int] = {}
        self.handled_created: dict[grpc.StatusCode, float] = {}
        self.seconds = HistogramSeries(labels, HANDLING_BUCKETS)

    def handle(self, code: grpc.StatusCode) -> None:
        """Count one call completed with code."""
        handled = self.handled
        if code in handled:
            handled[code] += 1
        else:
            self.handled_created[code] = time.time()
            handled[code] = 1


class RpcCollector(Collector):
    """Exposes the lock-free RPC and storage series, named and typed as prometheus_client would.

    The families, label names, sample names (``_total``, ``_created``, ``_bucket``, ``_count``,
    ``_sum``) and their order are those of the Counter, Gauge and Histogram they replace.
    """

    def __init__(self) -> None:
        """Start with no series; MethodMetrics and storage_series add theirs."""
        self._methods: dict[tuple[str, ...], MethodMetrics] = {}
        self._storage: dict[str, HistogramSeries] = {}

    def method(self, method: str, kind: str) -> MethodMetrics:
        """Return the series of method: one per label set, so every server adds to the same."""
        service, _, name = method.lstrip("/").partition("/")
        labels = (kind, service, name)
        metrics = self._methods.get(labels)
        if metrics is None:
            metrics = self._methods[labels] = MethodMetrics(labels)
        return metrics

    def storage_series(self, operation: str) -> HistogramSeries:
        """Return userservice_storage_seconds{operation}, created on its first use."""
        series = self._storage.get(operation)
        if series is None:
            series = self._storage[operation] = HistogramSeries((operation,), STORAGE_BUCKETS)
        return series

    def describe(self) -> Iterable[Metric]:
        """Return the families without samples, so the registry can check names once."""
        return _families()

    def collect(self) -> Iterable[Metric]:
        """Return every family with a snapshot of its series."""
        started, handled, seconds, received, sent, open_streams, storage = _families()
        for metrics in list(self._methods.values()):
            labels = dict(zip(_METHOD_LABELS, metrics.labels, strict=True))
            _counter(started, labels, metrics.started, metrics.created)
            for code, count in list(metrics.handled.items()):
                created = metrics.handled_created.get(code, metrics.created)
                _counter(handled, {**labels, "grpc_code": GO_CODE_NAMES[code]}, count, created)
            _histogram(seconds, labels, metrics.seconds)
            _counter(received, labels, metrics.received, metrics.created)
            _counter(sent, labels, metrics.sent, metrics.created)
            open_streams.add_sample(open_streams.name, labels, float(metrics.open_streams))
        for operation, series in list(self._storage.items()):
            _histogram(storage, {"operation": operation}, series)
        return (started, handled, seconds, received, sent, open_streams, storage)


def _families() -> tuple[Metric, ...]:
    return (
        Metric("grpc_server_started", "RPCs started on the server.", "counter"),
        Metric(
            "grpc_server_handled", "RPCs completed on the server, by final status code.", "counter"
        ),
        Metric(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its final status, in seconds.",
            "histogram",
        ),
        Metric("grpc_server_msg_received", "Messages received from clients.", "counter"),
        Metric("grpc_server_msg_sent", "Messages sent to clients.", "counter"),
        Metric("userservice_open_streams", "Streaming RPCs in progress on this replica.", "gauge"),
        Metric(
            "userservice_storage_seconds",
            "Time of one storage operation (a UserRepository method), in seconds.",
            "histogram",
        ),
    )


def _counter(family: Metric, labels: dict[str, str], value: int, created: float) -> None:
    family.add_sample(family.name + "_total", labels, float(value))
    if _CREATED_SERIES:
        family.add_sample(family.name + "_created", labels, created)


def _histogram(family: Metric, labels: dict[str, str], series: HistogramSeries) -> None:
    counts, total = list(series.counts), series.sum
    cumulative = 0
    for bound, count in zip((*series._bounds, math.inf), counts, strict=True):
        cumulative += count
        le = {**labels, "le": _le(bound)}
        family.add_sample(family.name + "_bucket", le, float(cumulative))
    family.add_sample(family.name + "_count", labels, float(cumulative))
    family.add_sample(family.name + "_sum", labels, total)
    if _CREATED_SERIES:
        family.add_sample(family.name + "_created", labels, series.created)


RPC_METRICS: Final = RpcCollector()
REGISTRY.register(RPC_METRICS)
method_metrics: Final = RPC_METRICS.method
"""Return the series of a method (full name) and kind, created on first use."""
storage_seconds: Final = RPC_METRICS.storage_series
"""Return userservice_storage_seconds{operation}, created on first use."""

REFUSALS: Final = Counter(
    "userservice_refusals_total",
    "Calls refused by auth, admission or the rate limit, by ErrorInfo reason.",
    ["reason"],
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
