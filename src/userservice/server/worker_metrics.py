"""`--workers N` metrics: the parent serves one /metrics that sums what every worker counted.

Each worker keeps its own prometheus_client registry (whatever collectors it holds) and writes
its whole exposition to anyone who connects to a Unix socket in a directory only the parent's
user can enter (mode 0700). The parent owns the public listener; on each scrape it reads every
live worker's exposition at once, with a short deadline, parses it and merges:

- counters, histograms (buckets, sum, count) and other gauges: summed per label set;
- ``*_info`` gauges (the same fact in every worker): one series, not N;
- ``userservice_health_status``: the lowest, so it is 1 only while every worker is SERVING;
- ``process_*`` and ``python_*``: one process each, so each worker's series get a ``worker``
  label (its index, stable across restarts) beside the parent's own, unlabelled;
- the ``*_created`` gauges of counters and histograms: dropped (each is one process's moment).

A worker that does not answer in time (or answers garbage) counts
``userservice_metrics_scrape_errors_total{worker}`` and is served from its last good answer,
so a sum never drops because one read failed. When a worker dies, its last counters and
histograms are kept in the parent and added to every later scrape, so the sums stay monotonic
across restarts (what it counted after the parent's last read of it is lost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    GCCollector,
    Metric,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

WORKER_READ_SECONDS: Final = 1.0
"""How long a scrape waits for the workers' answers (all read at once)."""

_CLIENT_SECONDS: Final = 5.0
"""How long the one-at-a-time public listener waits on a slow scraper."""

_POLL_SECONDS: Final = 0.05
"""How often the public listener checks for a stop (it stops around every fork)."""

_PER_PROCESS_PREFIXES: Final = ("process_", "python_")
_LOWEST_GAUGES: Final = frozenset({"userservice_health_status"})
_SUMMED_TYPES: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

_Labels = tuple[tuple[str, str], ...]
_Key = tuple[str, _Labels]


@dataclasses.dataclass
class Family:
    """One metric family: its samples keyed by sample name and sorted labels, in order."""

    name: str
    type: str
    documentation: str
    samples: dict[_Key, float] = dataclasses.field(default_factory=dict)


def families(metrics: Iterable[Metric]) -> dict[str, Family]:
    """Return metrics (parsed or collected) as families, without creation-time series."""
    found: dict[str, Family] = {}
    for metric in metrics:
        family = Family(metric.name, metric.type, metric.documentation)
        for sample in metric.samples:
            # Quantiles cannot be added up; OpenMetrics puts _created inside its family.
            if sample.name.endswith("_created") or (
                metric.type == "summary" and "quantile" in sample.labels
            ):
                continue
            family.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        found[metric.name] = family
    # The text format puts a counter's or histogram's _created in a gauge family of its own.
    for name, family in list(found.items()):
        if family.type in _SUMMED_TYPES:
            found.pop(f"{name}_created", None)
    return found


def parse(exposition: str) -> dict[str, Family]:
    """Parse a worker's text exposition (ValueError if it is not one)."""
    return families(text_string_to_metric_families(exposition))


def _per_process(name: str) -> bool:
    return name.startswith(_PER_PROCESS_PREFIXES)


def _merge(into: dict[str, Family], family: Family, worker: str | None = None) -> None:
    """Add family's samples to into's family of the same name, as its kind says."""
    target = into.get(family.name)
    if target is None:
        target = into[family.name] = Family(family.name, family.type, family.documentation)
    lowest = family.name in _LOWEST_GAUGES
    one_of = family.type in ("info", "stateset") or (
        family.type == "gauge" and family.name.endswith("_info")
    )
    for (name, labels), value in family.samples.items():
        key = (name, tuple(sorted((*labels, ("worker", worker))))) if worker else (name, labels)
        known = target.samples.get(key)
        if known is None:
            target.samples[key] = value
        elif lowest:
            target.samples[key] = min(known, value)
        elif one_of:
            target.samples[key] = max(known, value)
        else:
            target.samples[key] = known + value


def combine(
    own: dict[str, Family],
    retired: dict[str, Family],
    workers: Iterable[tuple[int, dict[str, Family]]],
) -> dict[str, Family]:
    """Merge the parent's own process series, dead workers' totals and live workers' answers."""
    merged: dict[str, Family] = {}
    for family in own.values():
        if _per_process(family.name):
            _merge(merged, family)
    for family in retired.values():
        _merge(merged, family)
    for index, answer in workers:
        for family in answer.values():
            _merge(merged, family, str(index) if _per_process(family.name) else None)
    return merged


def retire(retired: dict[str, Family], answer: dict[str, Family]) -> None:
    """Keep a dead worker's counters and histograms: later sums must not go backwards."""
    for family in answer.values():
        if family.type in _SUMMED_TYPES and not _per_process(family.name):
            _merge(retired, family)


def to_metric(family: Family) -> Metric:
    """Return family as a prometheus_client Metric for the parent's registry."""
    metric = Metric(family.name, family.documentation, family.type)
    for (name, labels), value in family.samples.items():
        metric.add_sample(name, dict(labels), value)
    return metric


def read_all(paths: dict[int, str], within: float) -> dict[int, bytes | None]:
    """Read each Unix socket to its end, all at once, for at most within seconds.

    Returns bytes for those that answered in time, None for those that failed or did not; a
    socket that does not exist (yet) is left out: its worker has not started serving.
    """
    answers: dict[int, bytes | None] = {}
    pending: dict[socket.socket, tuple[int, bytearray]] = {}
    with selectors.DefaultSelector() as selector:
        for pid, path in paths.items():
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.setblocking(False)
            try:
                connection.connect(path)
            except FileNotFoundError:
                connection.close()
                continue
            except OSError:
                connection.close()
                answers[pid] = None
                continue
            pending[connection] = (pid, bytearray())
            selector.register(connection, selectors.EVENT_READ, connection)
        deadline = time.monotonic() + within
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for ready, _ in selector.select(remaining):
                    connection = ready.data
                    pid, received = pending[connection]
                    try:
                        chunk = connection.recv(65536)
                    except OSError:
                        chunk = None
                    if chunk:
                        received.extend(chunk)
                        continue
                    answers[pid] = None if chunk is None else bytes(received)
                    selector.unregister(connection)
                    connection.close()
                    del pending[connection]
        finally:
            for connection, (pid, _) in pending.items():
                answers[pid] = None
                connection.close()
    return answers


class WorkersCollector:
    """A collector that merges the parent's process series with every worker's exposition."""

    def __init__(self, directory: str, errors: Counter) -> None:
        """Read workers' sockets in directory; count failed reads in errors{worker}."""
        self._directory = directory
        self._errors = errors
        # The parent's own: registered nowhere but read with the workers' (same families).
        self._own: list[Collector] = [
            ProcessCollector(registry=None),
            PlatformCollector(registry=None),
            GCCollector(registry=CollectorRegistry()),
        ]
        self._lock = threading.Lock()
        # The supervisor (main thread) writes these two; collect() reads them.
        self._live: dict[int, int] = {}
        self._ended: list[int] = []
        # Only collect() (one scrape at a time) touches these.
        self._answers: dict[int, dict[str, Family]] = {}
        self._retired: dict[str, Family] = {}

    def socket_path(self, pid: int) -> str:
        """Return where the worker with this pid serves its registry."""
        return os.path.join(self._directory, f"{pid}.sock")

    def started(self, index: int, pid: int) -> None:
        """Note a new worker, to be read from the next scrape on."""
        with self._lock:
            self._live[pid] = index

    def ended(self, pid: int) -> None:
        """Note a worker's end: its last answer joins the retired totals at the next scrape."""
        with self._lock:
            if self._live.pop(pid, None) is not None:
                self._ended.append(pid)
        # A killed worker could not remove its socket.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path(pid))

    def collect(self) -> Iterator[Metric]:
        """Read the live workers, fold in the ended ones, and yield the merged families."""
        with self._lock:
            live = dict(self._live)
            ended, self._ended = self._ended, []
        answers = read_all({pid: self.socket_path(pid) for pid in live}, WORKER_READ_SECONDS)
        for pid, data in answers.items():
            try:
                if data is None:
                    raise ValueError("no answer in time")
                self._answers[pid] = parse(data.decode())
            except ValueError as error:
                self._errors.labels(str(live[pid])).inc()
                log.warning("cannot read worker %d's metrics: %s", live[pid], error)
        for pid in ended:
            answer = self._answers.pop(pid, None)
            if answer is not None:
                retire(self._retired, answer)
        own = families(metric for collector in self._own for metric in collector.collect())
        workers = sorted(
            (live[pid], answer) for pid, answer in self._answers.items() if pid in live
        )
        for family in combine(own, self._retired, workers).values():
            yield to_metric(family)


class _QuietHandler(WSGIRequestHandler):
    """Serves one scrape without an access line, and gives up on a client that stalls."""

    timeout = _CLIENT_SECONDS

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing: Prometheus scrapes every few seconds."""


class _Server6(WSGIServer):
    """The public listener on an IPv6 address."""

    address_family = socket.AF_INET6


class ParentMetrics:
    """The public /metrics of a `--workers N` parent: one listener, the workers' sum.

    It serves one scrape at a time on one thread, and that thread is stopped around each fork
    (before_fork/after_fork), so a worker is never forked while another thread of the parent
    holds a lock the child would inherit held.
    """

    def __init__(self, address: str, workers: int) -> None:
        """Bind address (host:port) now, and make the directory of the workers' sockets."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"  # noqa: S104
        family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]
        self._directory = tempfile.mkdtemp(prefix="userservice-metrics-")
        errors = Counter(
            "userservice_metrics_scrape_errors",
            "Reads of a worker's metrics that failed or timed out (its last answer was served).",
            ["worker"],
            registry=None,
        )
        for index in range(workers):
            errors.labels(str(index))
        self.collector = WorkersCollector(self._directory, errors)
        registry = CollectorRegistry(support_collectors_without_names=True)
        # The workers first: a read that fails in this scrape is counted in this scrape.
        registry.register(self.collector)
        registry.register(errors)
        server_class = _Server6 if family == socket.AF_INET6 else WSGIServer
        try:
            self._server = make_server(
                host, int(port), make_wsgi_app(registry), server_class, _QuietHandler
            )
        except BaseException:
            shutil.rmtree(self._directory, ignore_errors=True)
            raise
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """Return the bound port (the real one when port 0 was asked for)."""
        return int(self._server.server_address[1])

    def before_fork(self) -> None:
        """Stop serving (after the scrape in progress) so the fork copies no other thread."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None

    def after_fork(self, index: int, pid: int) -> None:
        """In the parent: note the new worker and serve again."""
        self.collector.started(index, pid)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(_POLL_SECONDS,),
            name="metrics",
            daemon=True,
        )
        self._thread.start()

    def ended(self, pid: int) -> None:
        """In the parent: a worker exited."""
        self.collector.ended(pid)

    def in_worker(self) -> str:
        """In a new worker: let go of the public listener; return where to serve this registry."""
        self._server.socket.close()
        return self.collector.socket_path(os.getpid())

    def close(self) -> None:
        """Stop serving, release the port and remove the workers' socket directory."""
        self.before_fork()
        self._server.server_close()
        shutil.rmtree(self._directory, ignore_errors=True)


class _ExpositionHandler(socketserver.BaseRequestHandler):
    """Writes the registry's whole text exposition and closes: the parent reads to the end."""

    def handle(self) -> None:
        """Send this process's metrics."""
        server = self.server
        assert isinstance(server, WorkerExporter)
        self.request.sendall(generate_latest(server.registry))


class WorkerExporter(socketserver.UnixStreamServer):
    """A worker's registry, served on a Unix socket in the parent's private directory."""

    def __init__(self, path: str, registry: CollectorRegistry = REGISTRY) -> None:
        """Bind path (a stale file there is replaced) and start serving on a thread."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        super().__init__(path, _ExpositionHandler)
        self.path = path
        self.registry = registry
        self._thread = threading.Thread(
            target=self.serve_forever, args=(_POLL_SECONDS,), name="metrics-exporter", daemon=True
        )
        self._thread.start()

    def handle_error(self, request: object, client_address: object) -> None:
        """Log quietly: after a timeout the parent has hung up, and the late write fails."""
        log.debug("writing metrics to the parent failed", exc_info=True)

    def close(self) -> None:
        """Stop serving and remove the socket (first, so the parent sees no half-closed one)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.shutdown()
        self.server_close()
        self._thread.join()
