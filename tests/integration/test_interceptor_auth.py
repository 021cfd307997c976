"""Auth: JWT bearer tokens (HS256, RS256 PEM, ES256 JWKS) and per-method scopes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.interceptor_harness import (
    BIDI_STREAM,
    BY_KIND,
    CLIENT_STREAM,
    SERVER_STREAM,
    UNARY,
    UNLISTED,
    Result,
    refused_requests,
    serve,
    settings,
)
from helpers.tokens import ALL_SCOPES, token
from helpers.tokens import TEST_AUDIENCE as AUDIENCE
from helpers.tokens import TEST_ISSUER as ISSUER
from helpers.tokens import TEST_JWT_SECRET as SECRET

from userservice.config import ConfigError, load_key_file
from userservice.interceptors.auth import current_principal, mint_token
from userservice.interceptors.auth.keys import KeyEntry
from userservice.interceptors.auth.verifier import TokenVerifier
from userservice.policy import (
    METHODS,
    OPERATIONS_SERVICE,
    SERVICE,
    USER_METHODS,
    method_path,
)
from userservice.server.wiring import verifier_from_settings

CHALLENGE = 'Bearer realm="userservice"'
INVALID_CHALLENGE = CHALLENGE + ', error="invalid_token"'


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "subject-1",
        "scope": " ".join(ALL_SCOPES),
        "iat": now,
        "exp": now + 300,
        "iss": ISSUER,
        "aud": AUDIENCE,
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def _hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _assert_invalid(result: Result) -> None:
    assert result.code is grpc.StatusCode.UNAUTHENTICATED
    assert result.details == "invalid bearer token"
    assert result.trailing_metadata["www-authenticate"] == INVALID_CHALLENGE
    assert result.reason == "TOKEN_INVALID"


def _pem(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM])
async def test_valid_token_reaches_the_handler_on_every_kind(kind: str) -> None:
    async with serve(settings()) as harness:
        result = await harness.call(BY_KIND[kind], b"x", token=token())
        assert result.code is grpc.StatusCode.OK
        assert result.responses


@pytest.mark.asyncio
async def test_handler_sees_the_principal() -> None:
    async with serve(settings()) as harness:
        result = await harness.call("GetUser", b"whoami", token=token("user-7"))
        assert result.responses == [b"user-7"]
    assert current_principal() is None


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM])
@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwYXNz", "Bearer ", "Bearer"])
async def test_missing_token_is_unauthenticated(kind: str, header: str | None) -> None:
    metadata = [] if header is None else [("authorization", header)]
    async with serve(settings()) as harness:
        result = await harness.call(BY_KIND[kind], *refused_requests(kind), metadata=metadata)
    assert result.code is grpc.StatusCode.UNAUTHENTICATED
    assert result.details == "missing bearer token"
    assert result.trailing_metadata["www-authenticate"] == CHALLENGE
    assert result.reason == "TOKEN_MISSING"
    assert result.responses == []


def _invalid_tokens() -> dict[str, str]:
    now = int(time.time())
    valid = _hs256(_claims())
    header, payload, signature = valid.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "admin"
    tampered = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    return {
        "expired": _hs256(_claims(exp=now - 120)),
        "not-yet-valid": _hs256(_claims(nbf=now + 120)),
        "wrong-audience": _hs256(_claims(aud="another-service")),
        "no-audience": _hs256(_claims(aud=None)),
        "wrong-issuer": _hs256(_claims(iss="https://evil.test")),
        "no-exp": _hs256(_claims(exp=None)),
        "no-sub": _hs256(_claims(sub=None)),
        "empty-sub": _hs256(_claims(sub="")),
        "alg-none": _forge({"alg": "none", "typ": "JWT"}, _claims(), lambda _: b""),
        "tampered-payload": tampered,
        "wrong-secret": _hs256(_claims(), secret="another-secret-0123456789abcdefghij"),
        "garbage": "not-a-jwt",
        "three-garbage-parts": "a.b.c",
        "lifetime-over-the-maximum": _hs256(_claims(exp=now + 86_400 + 60)),
        "no-iat-and-exp-beyond-the-maximum": _hs256(_claims(iat=None, exp=now + 86_400 + 60)),
        "typ-not-a-jwt": jwt.encode(_claims(), SECRET, "HS256", headers={"typ": "dpop+jwt"}),
        "typ-not-a-string": jwt.encode(_claims(), SECRET, "HS256", headers={"typ": 7}),
        "scope-not-a-string": _hs256(_claims(scope=["users.read"])),
        "scp-not-strings": _hs256(_claims(scope=None, scp=["users.read", 7])),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(_invalid_tokens()))
async def test_invalid_tokens_are_rejected_without_the_reason(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="userservice.auth")
    async with serve(settings()) as harness:
        assert (await harness.call("GetUser", b"x", token=_hs256(_claims()))).responses == [b"x"]
        result = await harness.call("GetUser", b"x", token=_invalid_tokens()[case])
    _assert_invalid(result)
    reasons = [r.getMessage() for r in caplog.records if r.name == "userservice.auth"]
    assert len(reasons) == 1
    assert reasons[0].startswith("bearer token rejected: ")


@pytest.mark.asyncio
async def test_leeway_tolerates_small_clock_skew() -> None:
    now = int(time.time())
    async with serve(settings(auth_leeway_seconds=30)) as harness:
        for claims in (_claims(exp=now - 5), _claims(nbf=now + 5)):
            result = await harness.call("GetUser", b"x", token=_hs256(claims))
            assert result.code is grpc.StatusCode.OK


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    """A fresh RSA signing key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.asyncio
async def test_rs256_with_a_pem_public_key(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    pem = _pem(rsa_key.public_key())
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = _claims()
    config = settings(auth_jwt_secret="", auth_jwt_public_key_file=str(key_file))
    async with serve(config) as harness:
        good = await harness.call("GetUser", b"x", token=jwt.encode(claims, rsa_key, "RS256"))
        assert good.code is grpc.StatusCode.OK
        confused = _forge(
            {"alg": "HS256", "typ": "JWT"},
            claims,
            lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
        )
        _assert_invalid(await harness.call("GetUser", b"x", token=confused))
        _assert_invalid(
            await harness.call("GetUser", b"x", token=jwt.encode(claims, other, "RS256"))
        )
        es_key = ec.generate_private_key(ec.SECP256R1())
        _assert_invalid(
            await harness.call("GetUser", b"x", token=jwt.encode(claims, es_key, "ES256"))
        )
        _assert_invalid(await harness.call("GetUser", b"x", token=_hs256(claims)))


def _jwk(key: ec.EllipticCurvePrivateKey, kid: str | None) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    if kid is not None:
        jwk["kid"] = kid
    return jwk


@pytest.mark.asyncio
async def test_es256_with_a_jwks_picks_the_key_by_kid(tmp_path: Path) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_jwk(first, "k1"), _jwk(second, "k2")]}))
    claims = _claims()

    def es256(key: ec.EllipticCurvePrivateKey, kid: str | None) -> str:
        headers = {} if kid is None else {"kid": kid}
        return jwt.encode(claims, key, "ES256", headers=headers)

    config = settings(auth_jwt_secret="", auth_jwt_public_key_file=str(jwks))
    async with serve(config) as harness:
        for good in (es256(first, "k1"), es256(second, "k2")):
            assert (await harness.call("GetUser", b"x", token=good)).code is grpc.StatusCode.OK
        for bad in (es256(first, "k2"), es256(first, "k3"), es256(first, None)):
            _assert_invalid(await harness.call("GetUser", b"x", token=bad))


@pytest.mark.asyncio
async def test_jwks_with_one_key_accepts_tokens_without_kid(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_jwk(key, None)]}))
    config = settings(auth_jwt_secret="", auth_jwt_public_key_file=str(jwks))
    async with serve(config) as harness:
        result = await harness.call("GetUser", b"x", token=jwt.encode(_claims(), key, "ES256"))
        assert result.code is grpc.StatusCode.OK


@pytest.mark.asyncio
# The harness serves UserService's methods; test_operations covers the Operations service's.
@pytest.mark.parametrize(
    ("method", "scope"), sorted((p.path, p.scope) for p in USER_METHODS.values())
)
async def test_each_method_needs_its_scope(method: str, scope: str) -> None:
    name = method.rpartition("/")[2]
    others = [other for other in ALL_SCOPES if other != scope]
    async with serve(settings()) as harness:
        denied = await harness.call(name, b"x", token=token(scopes=others))
        allowed = await harness.call(name, b"x", token=token(scopes=[scope]))
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED
    assert denied.details == f"missing scope {scope}"
    assert denied.trailing_metadata["www-authenticate"] == (
        f'{CHALLENGE}, error="insufficient_scope", scope="{scope}"'
    )
    assert denied.reason == "SCOPE_MISSING"
    assert allowed.code is grpc.StatusCode.OK


def test_every_method_of_the_service_declares_its_policy() -> None:
    declared = [*SERVICE.methods, *OPERATIONS_SERVICE.methods]
    assert sorted(METHODS) == sorted(method_path(method) for method in declared)


@pytest.mark.asyncio
async def test_a_method_the_service_does_not_declare_is_denied() -> None:
    async with serve(settings()) as harness:
        denied = await harness.call(UNLISTED, b"x", token=token())
        anonymous = await harness.call(UNLISTED, b"x")
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED
    assert denied.reason == "METHOD_NOT_PERMITTED"
    assert anonymous.code is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.asyncio
async def test_health_needs_no_token() -> None:
    async with serve(settings()) as harness:
        stub = health_pb2_grpc.HealthStub(harness.channel)
        response = await stub.Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


class _CountingKeys:
    """A key source holding the test secret, recording every token it resolves."""

    generation = 0

    def __init__(self) -> None:
        self.resolved: list[str] = []

    def resolve(self, raw: str) -> KeyEntry:
        self.resolved.append(raw)
        return SECRET, ("HS256",)

    async def refresh_unknown(self) -> bool:
        return False

    def on_change(self, listener: Callable[[], None]) -> None:
        return None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _counting_verifier(leeway: float = 0.0, **options: Any) -> tuple[TokenVerifier, list[str]]:
    keys = _CountingKeys()
    options = {"issuer": ISSUER, "audience": AUDIENCE, **options}
    return TokenVerifier(keys, leeway=leeway, **options), keys.resolved


@pytest.mark.asyncio
async def test_verifications_are_cached_by_token() -> None:
    verifier, resolved = _counting_verifier()
    raw = token("cached")
    first, second = await verifier.verify(raw), await verifier.verify(raw)
    assert first == second
    assert first.subject == "cached"
    assert first.scopes == frozenset(ALL_SCOPES)
    assert resolved == [raw]


@pytest.mark.asyncio
async def test_a_cached_token_is_not_served_past_its_exp() -> None:
    verifier, resolved = _counting_verifier(leeway=0.0)
    claims = _claims(exp=int(time.time()) + 1)
    raw = _hs256(claims)
    await verifier.verify(raw)
    time.sleep(max(0.0, claims["exp"] - time.time()) + 0.05)
    with pytest.raises(jwt.ExpiredSignatureError):
        await verifier.verify(raw)
    assert resolved == [raw, raw]


@pytest.mark.asyncio
async def test_the_cache_is_bounded() -> None:
    verifier, _ = _counting_verifier(cache_size=3)
    for index in range(10):
        await verifier.verify(token(f"user-{index}"))
    assert len(verifier._cache) == 3


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "users.read  users.write"}, {"users.read", "users.write"}),
        ({"scp": ["users.read", "users.admin"]}, {"users.read", "users.admin"}),
        ({"scp": "users.read users.write"}, {"users.read", "users.write"}),
        ({"scope": "users.read", "scp": ["users.admin"]}, {"users.read"}),
        ({}, set()),
    ],
    ids=["scope-string", "scp-list", "scp-string", "scope-wins-over-scp", "none"],
)
async def test_scopes_come_from_scope_or_scp(claims: dict[str, Any], scopes: set[str]) -> None:
    verifier, _ = _counting_verifier()
    raw = _hs256(_claims(**{"scope": None, **claims}))
    assert (await verifier.verify(raw)).scopes == frozenset(scopes)


@pytest.mark.asyncio
@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt"])
async def test_typ_jwt_and_at_jwt_are_accepted_in_any_case(typ: str) -> None:
    verifier, _ = _counting_verifier()
    raw = jwt.encode(_claims(), SECRET, "HS256", headers={"typ": typ})
    assert (await verifier.verify(raw)).subject == "subject-1"


@pytest.mark.asyncio
async def test_the_maximum_lifetime_is_configurable() -> None:
    now = int(time.time())
    verifier, _ = _counting_verifier(max_lifetime=600)
    assert (await verifier.verify(_hs256(_claims(iat=now, exp=now + 600)))).subject
    with pytest.raises(jwt.InvalidTokenError, match="exceeds the maximum 600 s"):
        await verifier.verify(_hs256(_claims(iat=now, exp=now + 601)))
    # Issued an hour ago for 61 minutes: one minute left, but the lifetime is what counts.
    with pytest.raises(jwt.InvalidTokenError, match="lifetime"):
        await verifier.verify(_hs256(_claims(iat=now - 3600, exp=now + 60)))


def test_mint_token_claims() -> None:
    raw = mint_token(SECRET, "cli", ["users.read", "users.write"], 3600, "iss-1", "aud-1")
    claims = jwt.decode(raw, SECRET, ["HS256"], audience="aud-1", issuer="iss-1")
    assert claims["sub"] == "cli"
    assert claims["scope"] == "users.read users.write"
    assert 3590 <= claims["exp"] - time.time() <= 3600
    assert jwt.get_unverified_header(raw)["alg"] == "HS256"
    assert "aud" not in jwt.decode(mint_token(SECRET, "cli", [], 60), SECRET, ["HS256"])


@pytest.mark.parametrize(
    "content",
    [
        b"not a key",
        b'{"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}]}',
        b'{"keys": []}',
        _pem(ed25519.Ed25519PrivateKey.generate().public_key()),
    ],
    ids=["garbage", "symmetric-jwks", "empty-jwks", "ed25519"],
)
def test_unusable_key_files_are_config_errors(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE"):
        load_key_file(str(path))


def test_no_key_configured_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="authentication is required"):
        verifier_from_settings(settings().__class__())


@pytest.mark.asyncio
async def test_two_authorization_headers_are_refused_even_if_one_is_valid() -> None:
    # A proxy in front may have checked the other one: which token is meant is unclear.
    good = f"Bearer {token()}"
    async with serve(settings()) as harness:
        for headers in ([good, "Bearer forged"], ["Bearer forged", good], [good, good]):
            metadata = [("authorization", header) for header in headers]
            result = await harness.call("GetUser", b"x", metadata=metadata)
            assert result.code is grpc.StatusCode.UNAUTHENTICATED
            assert result.details == "more than one authorization header"
            assert result.reason == "TOKEN_INVALID"
