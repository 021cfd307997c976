"""Bearer token verification: the claims checked, against keys from interceptors.keys.

The accepted algorithm always comes from the configured key, never from the token
header, so ``alg: none`` and HS/RS confusion (an HS256 token "signed" with the public
key) fail. Beyond the signature: ``exp`` and ``sub`` are required, ``iss`` and ``aud``
when configured, the lifetime (``exp - iat``) is bounded, a ``typ`` header must say
``JWT`` or ``at+jwt`` (RFC 8725 section 3.11, RFC 9068), and scopes come from ``scope``
(space separated, RFC 8693) or else ``scp`` (a list, or a space-separated string).
Successful verifications are cached by token string until the token's ``exp`` (or
until the key set changes): a repeat token costs a dict lookup instead of a PyJWT decode.
Because ``exp`` is required, every accepted token has an end, which is also where the auth
interceptor ends a stream opened with it (``exp`` plus the leeway).
Rejection reasons never include the token or claim values the caller chose.
"""

from __future__ import annotations

import time
from typing import Any, Final, NamedTuple

import jwt

from userservice.interceptors.auth.keys import (
    KeySource,
    UnknownKeyError,
)

_TYPES: Final = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
DEFAULT_MAX_LIFETIME_SECONDS: Final = 86_400.0


class Principal(NamedTuple):
    """Who a verified token speaks for, what it may do, and until when (epoch seconds)."""

    subject: str
    scopes: frozenset[str]
    expires_at: float


class TokenVerifier:
    """Verify bearer tokens against one key source, caching successes until their exp."""

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str = "",
        audience: str = "",
        leeway: float = 0.0,
        max_lifetime: float = DEFAULT_MAX_LIFETIME_SECONDS,
        cache_size: int = 4096,
    ) -> None:
        """Check iss and aud only when given; exp and sub are always required."""
        self.keys = keys
        self._issuer = issuer or None
        self._audience = audience or None
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._cache_size = cache_size
        self._cache: dict[str, Principal] = {}
        self._generation = keys.generation

    @property
    def leeway(self) -> float:
        """The clock skew allowed: a token is accepted until its exp plus this many seconds."""
        return self._leeway

    async def verify(self, token: str) -> Principal:
        """Return the token's principal, or raise jwt.InvalidTokenError."""
        try:
            return self._verify(token)
        except UnknownKeyError:
            # Perhaps the issuer rotated its keys: look once more (the source rate-limits).
            if not await self.keys.refresh_unknown():
                raise
        return self._verify(token)

    def cached(self, token: str) -> Principal | None:
        """Return the principal of a token verified earlier and still valid, else None.

        What verify() answers from its cache, without a coroutine: the auth layer asks this
        first on every call and awaits verify() only for a token it has not seen.
        """
        if self.keys.generation != self._generation:
            return None
        cached = self._cache.get(token)
        if cached is not None and cached.expires_at > time.time():
            return cached
        return None

    def still_valid(self, token: str) -> bool:
        """Tell whether a token verified earlier still verifies against the current keys.

        Synchronous and without the refetch verify() makes for an unknown kid: it is asked
        right after the key set changed, so a kid missing now was withdrawn.
        """
        try:
            self._verify(token)
        except jwt.InvalidTokenError:
            return False
        return True

    def _verify(self, token: str) -> Principal:
        if self.keys.generation != self._generation:
            # A key may have been withdrawn: tokens it signed must not live on in the cache.
            self._cache.clear()
            self._generation = self.keys.generation
        cached = self._cache.get(token)
        now = time.time()
        if cached is not None:
            if cached.expires_at > now:
                return cached
            del self._cache[token]
        try:
            key, algorithms = self.keys.resolve(token)
            decoded = jwt.decode_complete(
                token,
                key,
                algorithms=list(algorithms),
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
        _check_type(decoded["header"])
        claims: dict[str, Any] = decoded["payload"]
        self._check_lifetime(claims, now)
        principal = Principal(_subject(claims), _scopes(claims), float(claims["exp"]))
        # Inside the leeway after exp PyJWT still accepts the token; the cache does not.
        if principal.expires_at > now:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = principal
        return principal

    def _check_lifetime(self, claims: dict[str, Any], now: float) -> None:
        # PyJWT has already checked that exp and iat (if present) are numbers. Without iat
        # the lifetime left must fit, allowing for an issuer whose clock runs ahead.
        issued_at = claims.get("iat")
        start = now + self._leeway if issued_at is None else float(issued_at)
        lifetime = float(claims["exp"]) - start
        if lifetime > self._max_lifetime:
            raise jwt.InvalidTokenError(
                f"token lifetime {lifetime:.0f} s exceeds the maximum {self._max_lifetime:.0f} s"
            )


def _check_type(header: dict[str, Any]) -> None:
    kind = header.get("typ")
    if kind is not None and (not isinstance(kind, str) or kind.lower() not in _TYPES):
        raise jwt.InvalidTokenError("unexpected typ header (expected JWT or at+jwt)")


def _subject(claims: dict[str, Any]) -> str:
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise jwt.InvalidTokenError("empty sub claim")
    return subject


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    if "scope" in claims:
        scope = claims["scope"]
        if not isinstance(scope, str):
            raise jwt.InvalidTokenError("the scope claim must be a space-separated string")
        return frozenset(scope.split())
    scp = claims.get("scp")
    if scp is None:
        return frozenset()
    if isinstance(scp, str):
        return frozenset(scp.split())
    if isinstance(scp, list) and all(isinstance(item, str) for item in scp):
        return frozenset(scp)
    raise jwt.InvalidTokenError("the scp claim must be a list of strings")
