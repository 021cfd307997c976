"""Signing keys rotate without a restart: a JWKS URL served by the test, and a key file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from helpers.interceptor_harness import Harness, Result, serve, settings
from helpers.jwks import JwksServer, Key
from helpers.jwks import jwks as _jwks
from helpers.servers import make_settings
from helpers.tokens import ALL_SCOPES
from helpers.tokens import TEST_AUDIENCE as AUDIENCE
from helpers.tokens import TEST_ISSUER as ISSUER

from userservice.interceptors.auth.keys import cache_seconds, display_url
from userservice.server import Application, StartupError


def _token(key: Key, kid: str) -> str:
    now = int(time.time())
    claims = {
        "sub": f"signed-by-{kid}",
        "scope": " ".join(ALL_SCOPES),
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    return jwt.encode(claims, key, "ES256", headers={"kid": kid, "typ": "at+jwt"})


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    """A JWKS HTTP server started (and stopped) by the test."""
    with JwksServer() as server:
        yield server


@contextlib.asynccontextmanager
async def serving_jwks(url: str, **overrides: Any) -> AsyncIterator[Harness]:
    config = settings(auth_jwt_secret="", auth_jwks_url=url, **overrides)
    async with serve(config) as harness:
        yield harness


async def code_for(harness: Harness, token: str) -> grpc.StatusCode:
    return (await harness.call("GetUser", b"x", token=token)).code


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.05)


OK, UNAUTHENTICATED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.asyncio
async def test_a_new_key_is_accepted_at_once_and_the_old_one_during_the_overlap(
    jwks_server: JwksServer,
) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.body = _jwks(old=old)
    async with serving_jwks(jwks_server.url, auth_jwks_refetch_seconds=60) as harness:
        assert await code_for(harness, _token(old, "old")) is OK
        assert jwks_server.hits == 1
        # The issuer publishes the new key next to the old one and starts signing with it.
        jwks_server.body = _jwks(old=old, new=new)
        assert await code_for(harness, _token(new, "new")) is OK
        assert jwks_server.hits == 2
        assert await code_for(harness, _token(old, "old")) is OK
        # Unknown kids do not make the service hammer the issuer: one refetch per interval.
        stranger = ec.generate_private_key(ec.SECP256R1())
        for kid in ("k-1", "k-2", "k-3"):
            assert await code_for(harness, _token(stranger, kid)) is UNAUTHENTICATED
        assert jwks_server.hits == 2


@pytest.mark.asyncio
async def test_concurrent_first_tokens_of_a_new_key_share_one_refetch(
    jwks_server: JwksServer,
) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.body = _jwks(old=old)
    async with serving_jwks(jwks_server.url, auth_jwks_refetch_seconds=60) as harness:
        jwks_server.body = _jwks(old=old, new=new)
        tokens = [_token(new, "new") for _ in range(20)]
        codes = await asyncio.gather(*(code_for(harness, raw) for raw in tokens))
    assert set(codes) == {OK}
    assert jwks_server.hits == 2


@pytest.mark.asyncio
async def test_a_withdrawn_key_stops_working_once_the_cached_set_expires(
    jwks_server: JwksServer,
) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.body = _jwks(old=old, new=new)
    jwks_server.cache_control = "public, max-age=1"
    async with serving_jwks(jwks_server.url, auth_jwks_min_cache_seconds=0.2) as harness:
        old_token = _token(old, "old")
        assert await code_for(harness, old_token) is OK  # now cached as verified
        jwks_server.body = _jwks(new=new)

        async def old_rejected() -> bool:
            return await code_for(harness, old_token) is UNAUTHENTICATED

        # No unknown kid is involved: the background refresh honours max-age by itself.
        await eventually(old_rejected)
        assert await code_for(harness, _token(new, "new")) is OK


@pytest.mark.asyncio
async def test_an_unreachable_issuer_keeps_the_keys_it_served(
    jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice.keys")
    key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.body = _jwks(current=key)
    jwks_server.cache_control = "max-age=0"
    async with serving_jwks(jwks_server.url, auth_jwks_min_cache_seconds=0.1) as harness:
        jwks_server.status = 503
        hits = jwks_server.hits

        async def retried() -> bool:
            return jwks_server.hits >= hits + 2

        await eventually(retried)
        assert await code_for(harness, _token(key, "current")) is OK
    assert any("JWKS refresh failed" in record.getMessage() for record in caplog.records)


@pytest.mark.asyncio
async def test_an_unreachable_jwks_url_at_start_up_is_a_startup_error(sqlite_url: str) -> None:
    config = make_settings(
        sqlite_url,
        auth_jwt_secret="",
        auth_jwks_url="http://127.0.0.1:9/jwks.json",
        auth_jwks_timeout_seconds=2,
    )
    with pytest.raises(StartupError, match="cannot fetch the JWKS from"):
        await Application(config).start()


def _headers(**values: str) -> Message:
    message = Message()
    for name, value in values.items():
        message[name.replace("_", "-")] = value
    return message


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Cache_Control": "public, max-age=120"}, 120),
        ({"Cache_Control": "max-age=120", "Age": "100"}, 30),
        ({"Cache_Control": "max-age=86400"}, 3600),
        ({"Cache_Control": "max-age=5"}, 30),
        ({"Cache_Control": "no-cache, max-age=120"}, 30),
        ({"Cache_Control": "no-store"}, 30),
        ({"Cache_Control": "max-age=soon"}, 30),
        ({}, 30),
    ],
)
def test_the_cache_lifetime_follows_max_age_within_the_bounds(
    headers: dict[str, str], seconds: float
) -> None:
    assert cache_seconds(_headers(**headers), 30, 3600) == seconds


def _write_atomically(path: Path, content: bytes) -> None:
    # As Kubernetes and cert-manager do: the new file is renamed over the old one.
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(content)
    temporary.replace(path)


@pytest.mark.asyncio
async def test_the_key_file_is_re_read_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice.keys")
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "jwks.json"
    key_file.write_bytes(_jwks(old=old))
    config = settings(
        auth_jwt_secret="", auth_jwt_public_key_file=str(key_file), reload_check_seconds=0.1
    )
    async with serve(config) as harness:
        old_token, new_token = _token(old, "old"), _token(new, "new")
        assert await code_for(harness, old_token) is OK
        assert await code_for(harness, new_token) is UNAUTHENTICATED
        _write_atomically(key_file, _jwks(old=old, new=new))

        async def new_accepted() -> bool:
            return await code_for(harness, new_token) is OK

        await eventually(new_accepted)
        assert await code_for(harness, old_token) is OK
        # A broken file is reported and ignored: the keys in use stay.
        key_file.write_bytes(b'{"keys": [')

        async def warned() -> bool:
            return any("key file unusable" in r.getMessage() for r in caplog.records)

        await eventually(warned)
        assert await code_for(harness, new_token) is OK
        _write_atomically(key_file, _jwks(new=new))

        async def old_rejected() -> bool:
            return await code_for(harness, old_token) is UNAUTHENTICATED

        await eventually(old_rejected)
        assert await code_for(harness, new_token) is OK


def test_logged_urls_carry_no_credentials_or_query() -> None:
    url = "https://client:s3cret@idp.example.com:8443/keys?api_key=s3cret#frag"
    assert display_url(url) == "https://idp.example.com:8443/keys"
    assert display_url("http://[::1]:8080/jwks.json") == "http://[::1]:8080/jwks.json"


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [b"[]", b"null", b"{not json", b'{"keys": [{"kty": "oct"}]}'])
async def test_a_broken_jwks_response_keeps_the_keys_in_use(
    jwks_server: JwksServer, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userservice.keys")
    key, stranger = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.body = _jwks(current=key)
    async with serving_jwks(jwks_server.url) as harness:
        jwks_server.body = body
        # An unknown kid makes the service refetch, and get the broken document.
        assert await code_for(harness, _token(stranger, "unknown")) is UNAUTHENTICATED
        assert jwks_server.hits == 2
        assert await code_for(harness, _token(key, "current")) is OK
    assert any("JWKS refetch failed" in record.getMessage() for record in caplog.records)


def _open_stream(harness: Harness, raw: str) -> asyncio.Task[Result]:
    """Open a server stream that stays open (a slow handler) until it is ended."""
    return asyncio.create_task(harness.call("WatchUsers", b"slow", token=raw, timeout=30))


async def _assert_withdrawn(ended: asyncio.Task[Result], lasting: asyncio.Task[Result]) -> None:
    result = await asyncio.wait_for(ended, 10)
    assert result.code is UNAUTHENTICATED
    assert result.reason == "KEY_WITHDRAWN"
    assert result.details == "bearer token no longer valid"
    assert result.trailing_metadata["www-authenticate"] == (
        'Bearer realm="userservice", error="invalid_token"'
    )
    await asyncio.sleep(0.3)
    assert not lasting.done(), "a stream signed with a key still in the set was ended"
    lasting.cancel()
    await asyncio.gather(lasting, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_stream_ends_when_the_key_file_no_longer_holds_its_signing_key(
    tmp_path: Path,
) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "jwks.json"
    key_file.write_bytes(_jwks(old=old, new=new))
    config = settings(
        auth_jwt_secret="", auth_jwt_public_key_file=str(key_file), reload_check_seconds=0.1
    )
    async with serve(config) as harness:
        signed_by_old = _open_stream(harness, _token(old, "old"))
        signed_by_new = _open_stream(harness, _token(new, "new"))
        await asyncio.sleep(0.3)
        # A key added keeps every stream: only a withdrawn key ends its streams.
        _write_atomically(
            key_file, _jwks(old=old, new=new, newer=ec.generate_private_key(ec.SECP256R1()))
        )
        await asyncio.sleep(0.5)
        assert not signed_by_old.done()
        _write_atomically(key_file, _jwks(new=new))
        await _assert_withdrawn(signed_by_old, signed_by_new)


@pytest.mark.asyncio
async def test_a_stream_ends_when_a_jwks_refresh_withdraws_its_signing_key(
    jwks_server: JwksServer,
) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server.body = _jwks(old=old, new=new)
    jwks_server.cache_control = "max-age=0"
    async with serving_jwks(jwks_server.url, auth_jwks_min_cache_seconds=0.2) as harness:
        signed_by_old = _open_stream(harness, _token(old, "old"))
        signed_by_new = _open_stream(harness, _token(new, "new"))
        await asyncio.sleep(0.5)
        assert not signed_by_old.done()
        jwks_server.body = _jwks(new=new)
        await _assert_withdrawn(signed_by_old, signed_by_new)
