"""Traces: a caller's traceparent continued by the server span, storage child spans, log ids."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.interceptor_harness import AccessLog
from helpers.servers import Client, connect, make_settings, suite_env
from helpers.users import new_user
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from user.v1 import user_service_pb2 as pb
from userservice.observability import otel
from userservice.observability.tracing import tracing_requested
from userservice.server import Application

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
MISSING_ID = "019b7a4e-6c2f-7d3e-8f1a-2b3c4d5e6f70"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Collects every finished span of the app under test."""
    return InMemorySpanExporter()


@pytest_asyncio.fixture
async def traced(sqlite_url: str, exporter: InMemorySpanExporter) -> AsyncIterator[Client]:
    """A client of a real server whose tracing exports to the in-memory exporter."""
    tracing = otel.from_environment({"OTEL_SERVICE_NAME": "users-test"}, "1.2.3", exporter)
    app = Application(make_settings(sqlite_url), tracing=tracing)
    await app.start()
    try:
        async with connect(app.port) as client:
            yield client
    finally:
        await app.stop()


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """Return the finished spans called name."""
    return [span for span in exporter.get_finished_spans() if span.name == name]


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """Return (trace id, span id) of span as the access log writes them."""
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


@pytest.mark.asyncio
async def test_server_span_continues_the_callers_traceparent(
    traced: Client,
    exporter: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = AccessLog(capsys, caplog)
    metadata = (*traced.metadata, ("traceparent", TRACEPARENT))
    created = await traced.stub.CreateUser(
        pb.CreateUserRequest(user=new_user("ada@x.org")), metadata=traced.metadata
    )
    exporter.clear()
    await traced.stub.GetUser(pb.GetUserRequest(id=created.user.id), metadata=metadata)

    (server,) = spans_named(exporter, "user.v1.UserService/GetUser")
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None
    assert server.parent.is_remote
    assert f"{server.parent.span_id:016x}" == PARENT_ID
    trace_id, span_id = hex_ids(server)
    assert trace_id == TRACE_ID
    attributes = dict(server.attributes or {})
    peer_port = attributes.pop("network.peer.port")
    assert isinstance(peer_port, int)
    assert peer_port > 0
    assert attributes == {
        "rpc.system": "grpc",
        "rpc.service": "user.v1.UserService",
        "rpc.method": "GetUser",
        "network.peer.address": "127.0.0.1",
        "rpc.grpc.status_code": 0,
    }
    assert server.status.status_code is StatusCode.UNSET
    assert server.resource.attributes["service.name"] == "users-test"
    assert server.resource.attributes["service.version"] == "1.2.3"

    (storage,) = spans_named(exporter, "UserRepository.get")
    assert storage.parent is not None
    assert storage.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert hex_ids(storage)[0] == TRACE_ID
    assert storage.kind is SpanKind.CLIENT
    assert storage.attributes is not None
    assert storage.attributes["db.system.name"] == "sqlite"
    assert storage.attributes["db.operation.name"] == "get"

    (line,) = await log.wait(lambda line: line["method"].endswith("/GetUser"))
    assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)


@pytest.mark.asyncio
async def test_without_traceparent_each_call_starts_a_trace(
    traced: Client, exporter: InMemorySpanExporter
) -> None:
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await traced.stub.GetUser(pb.GetUserRequest(id=MISSING_ID), metadata=traced.metadata)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    servers = spans_named(exporter, "user.v1.UserService/GetUser")
    assert len(servers) == 2
    assert all(span.parent is None for span in servers)
    assert len({hex_ids(span)[0] for span in servers}) == 2
    # NOT_FOUND is the caller's mistake: the code is recorded, the span is not an error.
    assert [span.attributes["rpc.grpc.status_code"] for span in servers] == [5, 5]  # type: ignore[index]
    assert all(span.status.status_code is StatusCode.UNSET for span in servers)
    stored = spans_named(exporter, "UserRepository.get")
    assert {span.parent.span_id for span in stored} == {  # type: ignore[union-attr]
        span.context.span_id  # type: ignore[union-attr]
        for span in servers
    }


@pytest.mark.asyncio
async def test_refused_calls_are_traced_and_health_is_not(
    traced: Client, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await traced.stub.GetUser(pb.GetUserRequest(id=MISSING_ID))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    await health_pb2_grpc.HealthStub(traced.channel).Check(health_pb2.HealthCheckRequest())
    names = [span.name for span in exporter.get_finished_spans()]
    assert names == ["user.v1.UserService/GetUser"]
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_SERVICE_NAME": "users"}, False),
    ],
)
def test_the_standard_environment_turns_tracing_on(environ: dict[str, str], expected: bool) -> None:
    assert tracing_requested(environ) is expected


# Run in a fresh interpreter: the test process itself has imported OpenTelemetry.
_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    import grpc
    from helpers.servers import connect, make_settings, running_app
    from user.v1 import user_service_pb2 as pb

    async def main() -> None:
        async with running_app(make_settings(sys.argv[1])) as app, connect(app.port) as client:
            request = pb.GetUserRequest(id=sys.argv[2])
            try:
                await client.stub.GetUser(request, metadata=client.metadata)
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.NOT_FOUND
        print(json.dumps(sorted(name for name in sys.modules if name.startswith("opentelemetry"))))

    asyncio.run(main())
    """
)


async def _probe(environ: dict[str, str], sqlite_url: str) -> tuple[int, str, str]:
    tests = Path(__file__).parents[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PROBE,
        sqlite_url,
        MISSING_ID,
        cwd=tests,
        env={**environ, "PYTHONPATH": str(tests)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.asyncio
async def test_tracing_off_imports_nothing_of_opentelemetry(sqlite_url: str) -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    code, out, err = await _probe(environ, sqlite_url)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == []


@pytest.mark.asyncio
async def test_tracing_on_without_the_extra_is_a_clear_startup_error(sqlite_url: str) -> None:
    # A meta path entry that refuses opentelemetry stands in for an install without the extra.
    environ = {**os.environ, "OTEL_TRACES_EXPORTER": "console"}
    blocked = "import sys\nclass B:\n  def find_spec(self, name, *a):\n"
    blocked += "    if name.split('.')[0] == 'opentelemetry': raise ImportError(name=name)\n"
    blocked += "sys.meta_path.insert(0, B())\n"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        blocked + _PROBE,
        sqlite_url,
        MISSING_ID,
        cwd=Path(__file__).parents[1],
        env={**environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode != 0
    assert "cannot trace: OTEL_* asks for traces but OpenTelemetry is not installed" in err.decode()
    assert "install 'userservice[otel]'" in err.decode()


def _spans_printed(stdout: str) -> list[dict[str, object]]:
    """Parse the console exporter's output: JSON objects one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := stdout.find("{", at)) >= 0:
        span, at = decoder.raw_decode(stdout, at)
        spans.append(span)
    return spans


@pytest.mark.asyncio
async def test_userservice_serve_exports_spans_with_the_console_exporter(
    tmp_path: Path, sqlite_url: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = suite_env(
        USERSERVICE_LISTEN_ADDRESS=f"127.0.0.1:{port}",
        USERSERVICE_DATABASE_URL=sqlite_url,
        USERSERVICE_LOG_LEVEL="INFO",
        USERSERVICE_SHUTDOWN_DRAIN_SECONDS="0",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="users-console",
    )
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "userservice", "serve", env=environ, stdout=out, stderr=err
        )
    try:
        async with connect(port) as client:
            await asyncio.wait_for(client.channel.channel_ready(), timeout=30)
            metadata = (*client.metadata, ("traceparent", TRACEPARENT))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.stub.GetUser(pb.GetUserRequest(id=MISSING_ID), metadata=metadata)
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=30)
    assert code == 0, stderr.read_text()
    spans = _spans_printed(stdout.read_text())
    (server,) = [span for span in spans if span["name"] == "user.v1.UserService/GetUser"]
    assert server["kind"] == "SpanKind.SERVER"
    assert server["context"]["trace_id"] == "0x" + TRACE_ID  # type: ignore[index]
    assert server["parent_id"] == "0x" + PARENT_ID
    assert server["resource"]["attributes"]["service.name"] == "users-console"  # type: ignore[index]
    (storage,) = [span for span in spans if span["name"] == "UserRepository.get"]
    assert storage["parent_id"] == server["context"]["span_id"]  # type: ignore[index]
    access = [
        json.loads(line)
        for line in stderr.read_text().splitlines()
        if '"logger":"userservice.access"' in line
    ]
    (line,) = [line for line in access if line["method"].endswith("/GetUser")]
    assert line["trace_id"] == TRACE_ID
    assert "0x" + line["span_id"] == server["context"]["span_id"]  # type: ignore[index]
