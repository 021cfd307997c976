"""Bearer token verification: HS256 shared secret, or RS/ES public keys from a PEM or JWKS file.

The accepted algorithm always comes from the configured key, never from the token
header, so ``alg: none`` and HS/RS confusion (an HS256 token "signed" with the public
key) fail. Successful verifications are cached by token string until the token's
``exp``: a repeat token costs a dict lookup instead of ~30 µs of PyJWT.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from userservice.config import ConfigError, Settings

KeyResolver = Callable[[str], tuple[Any, Sequence[str]]]
"""Return the verification key and its one accepted algorithm for a (still unverified) token."""

_EC_ALGORITHMS: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_KEY_FILE_SETTING: Final = "USERSERVICE_AUTH_JWT_PUBLIC_KEY_FILE"


class Principal(NamedTuple):
    """Who a verified token speaks for, what it may do, and until when (epoch seconds)."""

    subject: str
    scopes: frozenset[str]
    expires_at: float


class TokenVerifier:
    """Verify bearer tokens against one key source, caching successes until their exp."""

    def __init__(
        self,
        resolve_key: KeyResolver,
        *,
        issuer: str = "",
        audience: str = "",
        leeway: float = 0.0,
        cache_size: int = 4096,
    ) -> None:
        """Check iss and aud only when given; exp and sub are always required."""
        self._resolve_key = resolve_key
        self._issuer = issuer or None
        self._audience = audience or None
        self._leeway = leeway
        self._cache_size = cache_size
        self._cache: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        """Return the token's principal, or raise jwt.InvalidTokenError."""
        cached = self._cache.get(token)
        now = time.time()
        if cached is not None:
            if cached.expires_at > now:
                return cached
            del self._cache[token]
        try:
            key, algorithms = self._resolve_key(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.InvalidTokenError:
            raise
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            # Hostile input must read as a bad token, not as a server fault.
            raise jwt.InvalidTokenError(f"undecodable token ({type(error).__name__})") from error
        principal = _principal(claims)
        # Inside the leeway after exp PyJWT still accepts the token; the cache does not.
        if principal.expires_at > now:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = principal
        return principal


def _principal(claims: dict[str, Any]) -> Principal:
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise jwt.InvalidTokenError("empty sub claim")
    raw = claims.get("scope", "")
    if isinstance(raw, str):
        scopes = frozenset(raw.split())
    elif isinstance(raw, list):
        scopes = frozenset(item for item in raw if isinstance(item, str))
    else:
        scopes = frozenset()
    return Principal(subject, scopes, float(claims["exp"]))


def verifier_from_settings(settings: Settings) -> TokenVerifier:
    """Build the verifier for the configured secret or public key file."""
    if settings.auth_jwt_secret:
        resolver = _fixed(settings.auth_jwt_secret, "HS256")
    elif settings.auth_jwt_public_key_file:
        resolver = load_key_file(settings.auth_jwt_public_key_file)
    else:
        raise ConfigError(
            "authentication is required: set USERSERVICE_AUTH_JWT_SECRET or " + _KEY_FILE_SETTING
        )
    return TokenVerifier(
        resolver,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        leeway=settings.auth_leeway_seconds,
    )


def _fixed(key: Any, algorithm: str) -> KeyResolver:
    algorithms = (algorithm,)

    def resolve(token: str) -> tuple[Any, Sequence[str]]:
        return key, algorithms

    return resolve


def load_key_file(path: str) -> KeyResolver:
    """Load a PEM public key or certificate (RSA or EC), or a JWKS document."""
    try:
        data = Path(path).read_bytes()
        if data.lstrip().startswith(b"{"):
            return _jwks(data.decode())
        return _pem(data)
    except (OSError, ValueError, jwt.PyJWTError) as error:
        raise ConfigError(f"{_KEY_FILE_SETTING}: cannot load {path!r}: {error}") from error


def _pem(data: bytes) -> KeyResolver:
    if b"-----BEGIN CERTIFICATE-----" in data:
        key: Any = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if isinstance(key, rsa.RSAPublicKey):
        return _fixed(key, "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return _fixed(key, _EC_ALGORITHMS[key.curve.name])
    raise ValueError(f"unsupported key type {type(key).__name__} (use RSA or EC P-256/384/521)")


def _jwks(text: str) -> KeyResolver:
    # Symmetric (oct) keys do not belong in a public key file: accepting one would let
    # anyone who can read the file mint tokens.
    keys = [
        jwk
        for jwk in jwt.PyJWKSet.from_json(text).keys
        if jwk.key_type in ("RSA", "EC") and jwk.public_key_use in (None, "sig")
    ]
    if not keys:
        raise ValueError("the JWKS holds no RSA or EC signing key")
    by_kid = {jwk.key_id: (jwk.key, (jwk.algorithm_name,)) for jwk in keys if jwk.key_id}
    only = (keys[0].key, (keys[0].algorithm_name,)) if len(keys) == 1 else None
    only_kid = keys[0].key_id

    def resolve(token: str) -> tuple[Any, Sequence[str]]:
        kid = jwt.get_unverified_header(token).get("kid")
        found = by_kid.get(kid) if isinstance(kid, str) else None
        if found is None and only is not None and (kid is None or only_kid is None):
            found = only
        if found is None:
            raise jwt.InvalidTokenError("no key in the JWKS matches the token's kid")
        return found

    return resolve
