"""How a `--workers N` parent merges its workers' expositions, from real registries and sockets."""

from __future__ import annotations

import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from userservice.server.worker_metrics import (
    Family,
    WorkerExporter,
    combine,
    families,
    parse,
    read_all,
    retire,
)


def worker_registry(calls: int, seconds: float, streams: int, serving: bool) -> dict[str, Family]:
    """One worker's exposition, as the parent parses it."""
    registry = CollectorRegistry()
    counter = Counter("calls", "Calls.", ["method"], registry=registry)
    counter.labels("GetUser").inc(calls)
    histogram = Histogram("took_seconds", "Time.", buckets=(0.1, 1.0), registry=registry)
    histogram.observe(seconds)
    Gauge("open_streams", "Streams.", registry=registry).set(streams)
    Gauge("userservice_health_status", "Serving.", ["grpc_service"], registry=registry).labels(
        ""
    ).set(1 if serving else 0)
    Info("build", "Build.", registry=registry).info({"version": "1"})
    Gauge("process_open_fds", "Fds.", registry=registry).set(10 + calls)
    return parse(generate_latest(registry).decode())


def value(merged: dict[str, Family], family: str, sample: str, **labels: str) -> float:
    return merged[family].samples[(sample, tuple(sorted(labels.items())))]


def test_counters_histograms_and_gauges_add_up_and_per_process_series_get_a_worker() -> None:
    merged = combine(
        {},
        {},
        [
            (0, worker_registry(3, 0.05, 1, serving=True)),
            (1, worker_registry(4, 0.5, 2, serving=False)),
        ],
    )
    assert value(merged, "calls", "calls_total", method="GetUser") == 7
    assert value(merged, "took_seconds", "took_seconds_bucket", le="0.1") == 1
    assert value(merged, "took_seconds", "took_seconds_bucket", le="1.0") == 2
    assert value(merged, "took_seconds", "took_seconds_count") == 2
    assert value(merged, "took_seconds", "took_seconds_sum") == 0.55
    assert value(merged, "open_streams", "open_streams") == 3
    # SERVING only while every worker is; the build is one fact, not two.
    assert (
        value(merged, "userservice_health_status", "userservice_health_status", grpc_service="")
        == 0
    )
    assert value(merged, "build_info", "build_info", version="1") == 1
    assert value(merged, "process_open_fds", "process_open_fds", worker="0") == 13
    assert value(merged, "process_open_fds", "process_open_fds", worker="1") == 14
    # One process's creation times mean nothing summed.
    assert not [name for name in merged if name.endswith("_created")]


def test_a_retired_worker_keeps_its_counters_and_histograms_only() -> None:
    retired: dict[str, Family] = {}
    retire(retired, worker_registry(3, 0.05, 1, serving=True))
    assert set(retired) == {"calls", "took_seconds"}
    merged = combine({}, retired, [(0, worker_registry(2, 0.05, 5, serving=True))])
    assert value(merged, "calls", "calls_total", method="GetUser") == 5
    assert value(merged, "took_seconds", "took_seconds_count") == 2
    assert value(merged, "open_streams", "open_streams") == 5


def test_the_parents_own_process_series_stay_unlabelled() -> None:
    registry = CollectorRegistry()
    Gauge("process_open_fds", "Fds.", registry=registry).set(4)
    Gauge("parent_only", "Not per process.", registry=registry).set(1)
    merged = combine(families(registry.collect()), {}, [(0, worker_registry(1, 0.1, 0, True))])
    assert value(merged, "process_open_fds", "process_open_fds") == 4
    assert value(merged, "process_open_fds", "process_open_fds", worker="0") == 11
    assert "parent_only" not in merged


def test_sockets_are_read_at_once_and_a_silent_one_does_not_hold_the_others(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    Counter("calls", "Calls.", registry=registry).inc(2)
    answering = WorkerExporter(str(tmp_path / "1.sock"), registry)
    # Listening but never accepting: a stopped worker looks like this to the parent.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "2.sock"))
    silent.listen()
    try:
        answers = read_all(
            {1: answering.path, 2: str(tmp_path / "2.sock"), 3: str(tmp_path / "3.sock")}, 0.5
        )
    finally:
        answering.close()
        silent.close()
    assert set(answers) == {1, 2}, "a socket not there yet is a worker still starting"
    assert answers[2] is None
    first = answers[1]
    assert first is not None
    assert value(parse(first.decode()), "calls", "calls_total") == 2
    assert not (tmp_path / "1.sock").exists()
