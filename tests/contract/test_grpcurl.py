"""grpcurl (the real binary) decodes error details, with -proto files and through reflection."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from helpers.servers import make_settings, run_to_end, running_app
from helpers.tokens import bearer

from userservice.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
PROTO_FLAGS = (
    "-import-path", "proto", "-import-path", "third_party/googleapis",
    "-proto", "user/v1/user_service.proto", "-proto", "google/rpc/error_details.proto",
)  # fmt: skip


async def _grpcurl(*args: str) -> tuple[int, str]:
    code, output = await run_to_end(GRPCURL, "-plaintext", *args, within=20, cwd=ROOT)
    return code, output.decode()


def _details(output: str) -> dict[str, dict[str, Any]]:
    """Parse grpcurl's numbered `Details:` lines into {type name: decoded JSON}."""
    found: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        _, _, rest = line.strip().partition(")\t")
        if rest.startswith("{"):
            detail = json.loads(rest)
            assert "@error" not in detail, detail
            found[detail["@type"].rsplit("/", 1)[1]] = detail
    return found


def _field(detail: dict[str, Any], name: str) -> Any:
    """Return a field by its proto name or its JSON name (grpcurl prints either, per source)."""
    head, *rest = name.split("_")
    return detail.get(name, detail.get(head + "".join(part.title() for part in rest)))


@pytest.mark.asyncio
@pytest.mark.parametrize("source", ["proto", "reflection"])
async def test_grpcurl_prints_error_info_and_bad_request(sqlite_url: str, source: str) -> None:
    flags = PROTO_FLAGS if source == "proto" else ()
    async with running_app(make_settings(sqlite_url, reflection=source == "reflection")) as app:
        code, output = await _grpcurl(
            *flags, "-H", f"authorization: {bearer()}", "-d", '{"user": {"email": "nope"}}',
            f"127.0.0.1:{app.port}", "user.v1.UserService/CreateUser",
        )  # fmt: skip
    assert code == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0], output
    details = _details(output)
    assert details["google.rpc.ErrorInfo"]["reason"] == "INVALID_FIELD"
    assert details["google.rpc.ErrorInfo"]["domain"] == "userservice"
    violations = _field(details["google.rpc.BadRequest"], "field_violations")
    assert {violation["field"] for violation in violations} == {"user.email", "user.display_name"}


@pytest.mark.asyncio
@pytest.mark.parametrize("source", ["proto", "reflection"])
async def test_grpcurl_prints_retry_info_when_rate_limited(sqlite_url: str, source: str) -> None:
    flags = PROTO_FLAGS if source == "proto" else ()
    settings = make_settings(
        sqlite_url, reflection=source == "reflection", rate_limit_rps=0.01, rate_limit_burst=1
    )
    async with running_app(settings) as app:
        call = (
            *flags, "-H", f"authorization: {bearer()}", "-d", '{"id": "nope"}',
            f"127.0.0.1:{app.port}", "user.v1.UserService/GetUser",
        )  # fmt: skip
        await _grpcurl(*call)
        code, output = await _grpcurl(*call)
    assert code == 64 + grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], output
    details = _details(output)
    assert _field(details["google.rpc.RetryInfo"], "retry_delay").endswith("s")
    assert details["google.rpc.ErrorInfo"]["reason"]


@pytest.mark.asyncio
async def test_grpcurl_describes_error_details_through_reflection(sqlite_url: str) -> None:
    async with running_app(make_settings(sqlite_url, reflection=True)) as app:
        code, output = await _grpcurl(f"127.0.0.1:{app.port}", "describe", "google.rpc.RetryInfo")
    assert code == 0, output
    assert "retry_delay" in output


async def _list_services(port: int, service: str) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        names: list[str] = []
        with contextlib.suppress(StopAsyncIteration):
            async for response in call:
                names += [entry.name for entry in response.list_services_response.service]
        return names


@pytest.mark.asyncio
async def test_reflection_answers_v1_and_v1alpha(sqlite_url: str) -> None:
    async with running_app(make_settings(sqlite_url, reflection=True)) as app:
        for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
            names = await _list_services(app.port, service)
            assert {"user.v1.UserService", V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME} <= set(names)
        code, output = await _grpcurl(f"127.0.0.1:{app.port}", "describe", V1_SERVICE_NAME)
    assert code == 0, output
    assert "ServerReflectionInfo" in output
