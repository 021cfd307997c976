"""TLS and mutual TLS on the real server, with certificates made by the test."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.pki import issue as _issue
from helpers.pki import key_pem as _key_pem
from helpers.pki import pem as _pem
from helpers.pki import tls_settings
from helpers.servers import make_settings, running_app
from helpers.tokens import bearer
from helpers.users import new_user

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc


def _channel(port: int, pki: dict[str, Path | bytes], *, client_cert: bool) -> grpc.aio.Channel:
    ca = Path(str(pki["ca.pem"])).read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=pki["client.key"] if client_cert else None,  # type: ignore[arg-type]
        certificate_chain=pki["client.pem"] if client_cert else None,  # type: ignore[arg-type]
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


@pytest.mark.asyncio
async def test_tls_serves_the_api_and_refuses_plaintext(
    sqlite_url: str, pki: dict[str, Path | bytes]
) -> None:
    settings = make_settings(sqlite_url, **tls_settings(pki, client_ca=False))
    async with running_app(settings) as app:
        async with _channel(app.port, pki, client_cert=False) as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            created = await stub.CreateUser(
                pb.CreateUserRequest(user=new_user("tls@example.com")),
                metadata=(("authorization", bearer()),),
                timeout=5,
            )
            assert created.user.email == "tls@example.com"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(plaintext).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_mutual_tls_requires_a_client_certificate(
    sqlite_url: str, pki: dict[str, Path | bytes]
) -> None:
    settings = make_settings(sqlite_url, **tls_settings(pki, client_ca=True))
    async with running_app(settings) as app:
        async with _channel(app.port, pki, client_cert=True) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        async with _channel(app.port, pki, client_cert=False) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _served_certificate(port: int, ca: bytes) -> x509.Certificate:
    """Open a fresh TLS connection (verifying against ca) and return the server's leaf."""
    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _replace(path: Path, content: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(content)
    temporary.replace(path)


@pytest.mark.asyncio
async def test_a_renewed_certificate_is_served_without_a_restart(
    sqlite_url: str, pki: dict[str, Path | bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice.tls")
    cert_file, key_file = Path(str(pki["server.pem"])), Path(str(pki["server.key"]))
    ca_pem = Path(str(pki["ca.pem"])).read_bytes()
    ca = (x509.load_pem_x509_certificate(ca_pem), pki["ca.key"])
    first = x509.load_pem_x509_certificate(cert_file.read_bytes())
    settings = make_settings(
        sqlite_url,
        tls_cert_file=str(cert_file),
        tls_key_file=str(key_file),
        reload_check_seconds=0.1,
    )
    deadline = time.monotonic() + 15
    async with running_app(settings) as app:
        served = await asyncio.to_thread(_served_certificate, app.port, ca_pem)
        assert served.serial_number == first.serial_number
        renewed, renewed_key = _issue("localhost", ca, server=True)  # type: ignore[arg-type]
        # Half a rotation (the new key, not yet its certificate): the old pair stays in use.
        _replace(key_file, _key_pem(renewed_key))
        while not any("TLS files not reloaded" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the mismatched pair was never looked at"
            served = await asyncio.to_thread(_served_certificate, app.port, ca_pem)
            assert served.serial_number == first.serial_number
            await asyncio.sleep(0.05)
        _replace(cert_file, _pem(renewed))
        while served.serial_number != renewed.serial_number:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            await asyncio.sleep(0.05)
            served = await asyncio.to_thread(_served_certificate, app.port, ca_pem)
        # A gRPC client on a new connection gets the new certificate and is served.
        async with _channel(app.port, pki, client_cert=False) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def _project_secret(directory: Path, files: dict[str, bytes], generation: int) -> None:
    """Write files as the kubelet updates a Secret volume: one atomic swap of ..data."""
    # The kubelet's layout: the files in a hidden timestamped directory, "..data" a symlink
    # to it, and each visible name a symlink through "..data". An update writes a new
    # directory and renames a new "..data" link over the old one, so every file changes at
    # once and none is ever half written.
    payload = directory / f"..generation_{generation}"
    payload.mkdir()
    for name, content in files.items():
        (payload / name).write_bytes(content)
    link = directory / "..data_tmp"
    link.symlink_to(payload.name)
    link.replace(directory / "..data")
    for name in files:
        visible = directory / name
        if not visible.is_symlink():
            visible.symlink_to(Path("..data") / name)


@pytest.mark.asyncio
async def test_a_renewed_secret_volume_is_served_without_a_restart(
    sqlite_url: str, tmp_path: Path
) -> None:
    # What cert-manager and the kubelet do to the production pod's userservice-tls mount.
    ca = _issue("test-ca", None)
    ca_pem = _pem(ca[0])
    mount = tmp_path / "tls"
    mount.mkdir()
    first, first_key = _issue("localhost", ca, server=True)
    _project_secret(mount, {"tls.crt": _pem(first), "tls.key": _key_pem(first_key)}, 1)
    settings = make_settings(
        sqlite_url,
        tls_cert_file=str(mount / "tls.crt"),
        tls_key_file=str(mount / "tls.key"),
        reload_check_seconds=0.1,
    )
    async with running_app(settings) as app:
        served = await asyncio.to_thread(_served_certificate, app.port, ca_pem)
        assert served.serial_number == first.serial_number
        renewed, renewed_key = _issue("localhost", ca, server=True)
        _project_secret(mount, {"tls.crt": _pem(renewed), "tls.key": _key_pem(renewed_key)}, 2)
        deadline = time.monotonic() + 15
        while served.serial_number != renewed.serial_number:
            assert time.monotonic() < deadline, "the renewed Secret was never served"
            await asyncio.sleep(0.05)
            served = await asyncio.to_thread(_served_certificate, app.port, ca_pem)


@pytest.mark.asyncio
async def test_probes_are_answered_in_plaintext_while_the_main_port_has_tls(
    sqlite_url: str, pki: dict[str, Path | bytes]
) -> None:
    settings = make_settings(
        sqlite_url,
        **tls_settings(pki, client_ca=True),
        probe_address="127.0.0.1:0",
    )
    async with running_app(settings) as app:
        # A kubelet gRPC probe speaks plaintext and carries no client certificate.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.probe_port}") as probe:
            health = health_pb2_grpc.HealthStub(probe)
            for service in ("liveness", "user.v1.UserService"):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(plaintext).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
