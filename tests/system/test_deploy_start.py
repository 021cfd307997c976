"""The rendered overlays start: each Deployment's own environment runs the real server.

The overlays are rendered with kubectl as `make deploy-check` renders them, and the server
process gets exactly the environment of the rendered container (its ConfigMap, literal
values and Secret references resolved), with only what cannot exist outside a cluster
replaced: listen addresses become free loopback ports, paths under a volume mount point into
a directory of the test, the Secrets that production references get the test's values, and
production's JWKS URL names a JWKS endpoint the test serves on 127.0.0.1. Production also
runs its migrate Job's container first, on a database set up with deploy/postgres/roles.sql:
the Job migrates as the migrator role and the server serves as the application role, which
cannot change the schema.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.databases import POSTGRES_ADMIN_URL, REDIS_URL, fresh_postgres_database
from helpers.jwks import JwksServer
from helpers.jwks import jwks as _jwks
from helpers.manifests import ROOT, Doc, environment, of_kind, one, rendered
from helpers.pki import issue as _issue
from helpers.pki import key_pem as _key_pem
from helpers.pki import pem as _pem
from helpers.ports import free_port
from helpers.processes import (
    Replica,
    assert_stopped_cleanly,
    channel_to,
    start_serving,
    stop_process,
    wait_serving,
)
from helpers.servers import run_userservice
from helpers.users import new_user

from user.v1 import user_pb2, user_service_pb2_grpc
from user.v1 import user_service_pb2 as pb
from userservice.interceptors.auth import mint_token

ROLES_SQL = ROOT / "deploy" / "postgres" / "roles.sql"
STARTUP_SECONDS = 30.0


def container_of(docs: tuple[Doc, ...], kind: str, name: str) -> tuple[Doc, Doc]:
    """The pod spec and the one container of a rendered workload."""
    spec = one(docs, kind, name)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def resolved_environment(
    docs: tuple[Doc, ...], container: Doc, secret_values: Mapping[str, str]
) -> dict[str, str]:
    """The container's variables with Secret references resolved, as the kubelet would.

    A generated Secret (development) is read from the rendered documents; a Secret created
    out of band (production) from secret_values, which must hold every key referenced.
    """
    env = environment(docs, container)
    generated = {
        secret["metadata"]["name"]: secret.get("data", {}) for secret in of_kind(docs, "Secret")
    }
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        if ref["name"] in generated:
            data = generated[ref["name"]]
            value = base64.b64decode(data[ref["key"]]).decode() if ref["key"] in data else None
        else:
            value = secret_values.get(ref["key"])
        if value is None:
            assert ref.get("optional") is True, f"no value for the Secret key {ref['key']}"
            continue
        env[entry["name"]] = value
    return env


def localized(
    env: Mapping[str, str], pod_spec: Doc, container: Doc, root: Path, files: Mapping[str, Any]
) -> dict[str, str]:
    """The environment moved onto this machine: loopback ports, mounts under root.

    files maps a Secret volume's secretName to the files (name -> bytes) the test puts in it;
    every Secret volume the container mounts must be given.
    """
    local: dict[str, str] = {}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    for mount in mounts:
        directory = root / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:
            assert "subPath" not in mount, "a subPath mount never sees the Secret's updates"
            for file_name, content in files[secret["secretName"]].items():
                (directory / file_name).write_bytes(content)
    for name, value in env.items():
        if name.endswith("_ADDRESS") and value:
            value = f"127.0.0.1:{free_port()}"
        for mount in mounts:
            # One substitution per value: a rebased path may itself contain another mount's
            # path (/tmp), which must stay as it is.
            if f"{mount['mountPath']}/" in value:
                value = value.replace(mount["mountPath"], str(root / mount["name"]), 1)
                break
        local[name] = value
    return local


def process_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any USERSERVICE_* variable, plus settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSERVICE_")}
    env.update(settings)
    return env


@contextlib.asynccontextmanager
async def serving(
    env: Mapping[str, str], log_path: Path, ca_pem: bytes | None
) -> AsyncIterator[Replica]:
    """Run `userservice serve` with env until its health Check says SERVING; stop it after."""
    port = int(env["USERSERVICE_LISTEN_ADDRESS"].rpartition(":")[2])
    replica = await start_serving(process_env(env), port, log_path)
    try:
        await wait_serving(replica, ca_pem, within=STARTUP_SECONDS)
        yield replica
    finally:
        await stop_process(replica.process)


async def exercise(port: int, ca_pem: bytes | None, token: str, email: str) -> None:
    """Create, get, list, watch and delete a user through the real API."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with channel_to(port, ca_pem) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        watch = stub.WatchUsers(pb.WatchUsersRequest(after_sequence=0), metadata=metadata)
        created = (
            await stub.CreateUser(
                pb.CreateUserRequest(user=new_user(email)), metadata=metadata, timeout=10
            )
        ).user
        got = await stub.GetUser(pb.GetUserRequest(id=created.id), metadata=metadata, timeout=10)
        assert got.user.email == email
        listed = await stub.ListUsers(pb.ListUsersRequest(), metadata=metadata, timeout=10)
        assert [user.id for user in listed.users] == [created.id]
        await stub.DeleteUser(pb.DeleteUserRequest(id=created.id), metadata=metadata, timeout=10)
        seen: list[int] = []

        async def follow() -> None:
            async for event in watch:
                if event.user.id == created.id:
                    seen.append(event.type)
                if user_pb2.USER_EVENT_TYPE_DELETED in seen:
                    return

        await asyncio.wait_for(follow(), 10)
        watch.cancel()
        assert seen == [user_pb2.USER_EVENT_TYPE_CREATED, user_pb2.USER_EVENT_TYPE_DELETED]


@pytest.mark.asyncio
async def test_the_development_overlay_starts_with_its_own_environment(tmp_path: Path) -> None:
    docs = rendered("development")
    pod_spec, container = container_of(docs, "Deployment", "userservice")
    env = localized(resolved_environment(docs, container, {}), pod_spec, container, tmp_path, {})
    assert env["USERSERVICE_DATABASE_URL"] == f"sqlite:///{tmp_path}/data/userservice.db"
    async with serving(env, tmp_path / "server.log", None) as replica:
        # The development secret of the generated Secret, as `make token` mints with it.
        token = mint_token(
            env["USERSERVICE_AUTH_JWT_SECRET"],
            "developer",
            ["users.read", "users.write"],
            300,
            env["USERSERVICE_AUTH_ISSUER"],
            env["USERSERVICE_AUTH_AUDIENCE"],
        )
        await exercise(replica.port, None, token, "dev@example.com")
    assert_stopped_cleanly(replica)


def role_url(admin_url: str, role: str) -> str:
    """The admin URL with another user name (trust authentication on the test server)."""
    parts = urllib.parse.urlsplit(admin_url)
    netloc = f"{role}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def database_with_roles() -> AsyncIterator[tuple[str, str]]:
    """A fresh database set up by roles.sql; yield the migrator's and the app's URLs.

    Roles are cluster-wide, so they get names of their own and are dropped afterwards (once
    the database, which holds their objects and default privileges, is gone).
    """
    suffix = uuid.uuid4().hex[:12]
    migrator, app = f"usertest_migrator_{suffix}", f"usertest_app_{suffix}"
    script = re.sub(r"\buserservice_migrator\b", migrator, ROLES_SQL.read_text())
    script = re.sub(r"\buserservice_app\b", app, script)
    try:
        async with fresh_postgres_database() as admin_url:
            admin = await asyncpg.connect(admin_url, timeout=5)
            try:
                await admin.execute(script)
            finally:
                await admin.close()
            yield role_url(admin_url, migrator), role_url(admin_url, app)
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            for role in (app, migrator):
                await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()


async def assert_no_ddl(app_url: str) -> None:
    """The application role may change rows, never the schema."""
    conn = await asyncpg.connect(app_url, timeout=5)
    try:
        for statement in (
            "CREATE TABLE intruder (id int)",
            "DROP TABLE users",
            "ALTER TABLE users ADD COLUMN intruder text",
            "CREATE INDEX intruder ON users (display_name)",
            "TRUNCATE user_events",
            "DROP TABLE schema_migrations",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        # Rows are what it is for.
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_the_production_overlay_migrates_as_the_migrator_and_serves_as_the_app_role(
    tmp_path: Path,
) -> None:
    docs = rendered("production")
    ca = _issue("test-ca", None)
    server_cert, server_key = _issue("localhost", ca, server=True)
    tls_files = {"userservice-tls": {"tls.crt": _pem(server_cert), "tls.key": _key_pem(server_key)}}
    signing_key = ec.generate_private_key(ec.SECP256R1())
    async with database_with_roles() as (migrator_url, app_url):
        secret_values = {
            "database-url": app_url,
            "migrate-database-url": migrator_url,
            "page-token-secret": secrets.token_urlsafe(48),
            "rate-limit-redis-url": REDIS_URL,
        }

        def environment_of(kind: str, name: str, values: Mapping[str, str]) -> dict[str, str]:
            pod_spec, container = container_of(docs, kind, name)
            env = resolved_environment(docs, container, values)
            return localized(env, pod_spec, container, tmp_path / name, tls_files)

        job_container = container_of(docs, "Job", "userservice-migrate")[1]
        assert job_container["args"] == ["migrate"]
        # The app role cannot migrate: the Job with the wrong URL fails, and changes nothing.
        with_app_url = {**secret_values, "migrate-database-url": app_url}
        code, output = await run_userservice(
            "migrate", env=process_env(environment_of("Job", "userservice-migrate", with_app_url))
        )
        assert code != 0, output
        assert "permission denied" in output, output
        code, output = await run_userservice(
            "migrate", env=process_env(environment_of("Job", "userservice-migrate", secret_values))
        )
        assert code == 0, output

        env = environment_of("Deployment", "userservice", secret_values)
        assert "USERSERVICE_AUTH_JWT_SECRET" not in env
        assert env["USERSERVICE_MIGRATE_ON_START"] == "false"
        with JwksServer() as jwks:
            jwks.body = _jwks(release=signing_key)
            env["USERSERVICE_AUTH_JWKS_URL"] = jwks.url
            async with serving(env, tmp_path / "server.log", _pem(ca[0])) as replica:
                now = int(time.time())
                token = jwt.encode(
                    {
                        "sub": "production-test",
                        "scope": "users.read users.write",
                        "iss": env["USERSERVICE_AUTH_ISSUER"],
                        "aud": env["USERSERVICE_AUTH_AUDIENCE"],
                        "iat": now,
                        "exp": now + 300,
                    },
                    signing_key,
                    "ES256",
                    headers={"kid": "release", "typ": "at+jwt"},
                )
                await exercise(replica.port, _pem(ca[0]), token, "prod@example.com")
                # The TLS port refuses plaintext.
                async with channel_to(replica.port, None) as plaintext:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await health_pb2_grpc.HealthStub(plaintext).Check(
                            health_pb2.HealthCheckRequest(), timeout=2
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert_stopped_cleanly(replica)
        await assert_no_ddl(app_url)
