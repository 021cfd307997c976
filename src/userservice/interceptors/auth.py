"""Authentication and authorization: a JWT bearer token, and one scope per method.

``METHOD_SCOPES`` is the one place that maps a method to the scope it needs; a method
missing from it is denied to everyone (fail closed). Which users a caller may write is the
domain's rule (``domain.model.Caller``): the transport builds the Caller from the subject
and scopes recorded here (``PRINCIPAL``, ``SCOPES``). Failures carry ErrorInfo (domain
``userservice``) and an RFC 6750 ``www-authenticate`` trailer, with a generic message:
why a token was rejected goes to the debug log, never to the caller.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import grpc
import jwt

from userservice.interceptors._call import PRINCIPAL, SCOPES, invocation_metadata, metadata_value
from userservice.interceptors._handlers import Behaviour, Context, WrappingInterceptor
from userservice.interceptors._status import Rejection, rejection
from userservice.interceptors.jwt_verifier import TokenVerifier
from userservice.interceptors.matcher import MethodMatcher

READ: Final = "users.read"
WRITE: Final = "users.write"
ADMIN: Final = "users.admin"

_SERVICE: Final = "/user.v1.UserService/"
METHOD_SCOPES: Final[Mapping[str, str]] = {
    _SERVICE + "GetUser": READ,
    _SERVICE + "BatchGetUsers": READ,
    _SERVICE + "ListUsers": READ,
    _SERVICE + "StreamUsers": READ,
    _SERVICE + "WatchUsers": READ,
    _SERVICE + "CreateUser": WRITE,
    _SERVICE + "UpdateUser": WRITE,
    _SERVICE + "DeleteUser": WRITE,
    _SERVICE + "ImportUsers": ADMIN,
    _SERVICE + "SyncUsers": ADMIN,
}

_log: Final = logging.getLogger("userservice.auth")
_CHALLENGE: Final = 'Bearer realm="userservice"'
_MISSING: Final = rejection(
    grpc.StatusCode.UNAUTHENTICATED,
    "missing bearer token",
    "TOKEN_MISSING",
    headers=[("www-authenticate", _CHALLENGE)],
)
_INVALID: Final = rejection(
    grpc.StatusCode.UNAUTHENTICATED,
    "invalid bearer token",
    "TOKEN_INVALID",
    headers=[("www-authenticate", _CHALLENGE + ', error="invalid_token"')],
)
_UNLISTED: Final = rejection(
    grpc.StatusCode.PERMISSION_DENIED, "method not permitted", "METHOD_NOT_PERMITTED"
)


def current_principal() -> str | None:
    """Return the authenticated subject (``sub``) of the current call, if any."""
    return PRINCIPAL.get()


def mint_token(
    secret: str,
    subject: str,
    scopes: Sequence[str],
    ttl_seconds: float,
    issuer: str = "",
    audience: str = "",
) -> str:
    """Return an HS256 token for subject with the given scopes, valid for ttl_seconds."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + max(1, int(ttl_seconds)),
        "jti": uuid.uuid4().hex,
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def _insufficient(scope: str) -> Rejection:
    return rejection(
        grpc.StatusCode.PERMISSION_DENIED,
        f"missing scope {scope}",
        "SCOPE_MISSING",
        info={"scope": scope},
        headers=[
            (
                "www-authenticate",
                f'{_CHALLENGE}, error="insufficient_scope", scope="{scope}"',
            )
        ],
    )


_AMBIGUOUS: Final = rejection(
    grpc.StatusCode.UNAUTHENTICATED,
    "more than one authorization header",
    "TOKEN_INVALID",
    headers=[("www-authenticate", _CHALLENGE + ', error="invalid_request"')],
)


def _bearer(metadata: Any) -> str | None:
    value = metadata_value(metadata, "authorization")
    if value is None or len(value) < 8 or value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


def _one_authorization(metadata: Any) -> bool:
    """Tell whether at most one authorization header came: a proxy may have checked another."""
    return sum(1 for item in metadata or () if item[0] == "authorization") <= 1


class AuthInterceptor(WrappingInterceptor):
    """Verifies the bearer token and the method's scope before the call reaches the handler."""

    def __init__(
        self,
        verifier: TokenVerifier,
        public: MethodMatcher,
        scopes: Mapping[str, str] = METHOD_SCOPES,
    ) -> None:
        """Serve methods matching public without a token; others need their scope."""
        super().__init__()
        self._verify = verifier.verify
        self._public = public
        self._scopes = scopes

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour behind the token and scope checks (None for public methods)."""
        if self._public.matches(method):
            return None
        scope = self._scopes.get(method)
        denied = _UNLISTED if scope is None else _insufficient(scope)
        verify = self._verify

        async def authorized(request: Any, context: Context) -> Any:
            metadata = invocation_metadata(context)
            if not _one_authorization(metadata):
                await _AMBIGUOUS.abort(context)
            token = _bearer(metadata)
            if token is None:
                await _MISSING.abort(context)
            try:
                principal = await verify(token)
            except jwt.InvalidTokenError as error:
                _log.debug("bearer token rejected: %s", error, extra={"method": method})
                await _INVALID.abort(context)
            PRINCIPAL.set(principal.subject)
            SCOPES.set(principal.scopes)
            if scope is None or scope not in principal.scopes:
                await denied.abort(context)
            return await behaviour(request, context)

        return authorized
