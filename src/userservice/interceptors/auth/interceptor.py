"""Authentication and authorization: a JWT bearer token, and one scope per method.

A method's scope is its ``(user.v1.method_policy)`` proto option, read by
``userservice.policy``; a method without one is denied to everyone (fail closed), and a
public one is served without a token. Which users a caller may write is the
domain's rule (``domain.model.Caller``): the transport builds the Caller from the subject
and scopes recorded here (``PRINCIPAL``, ``SCOPES``). Failures carry ErrorInfo (domain
``userservice``) and an RFC 6750 ``www-authenticate`` trailer, with a generic message:
why a token was rejected goes to the debug log, never to the caller.

A unary call is checked once, when it starts: it is over long before its token. A stream
lives as long as its token and no longer: one event-loop timer per stream, set for the
token's ``exp`` plus the leeway, ends it UNAUTHENTICATED (``TOKEN_EXPIRED``), and a change
of the key set re-checks every open stream's token, ending those whose signing key was
withdrawn (``KEY_WITHDRAWN``). Either ending cancels the handler's task, so nothing is
written after it; the status is then sent like any other abort (logged, counted).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, NoReturn, TypeAlias

import grpc
import jwt

from userservice.interceptors.auth.verifier import Principal, TokenVerifier
from userservice.interceptors.handlers import (
    UNARY,
    Behaviour,
    Context,
    WrappingInterceptor,
    is_batch_error,
)
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.status import Rejection, rejection
from userservice.policy import METHODS, MethodPolicy
from userservice.rpc_context import PRINCIPAL, SCOPES, invocation_metadata

READ: Final = "users.read"
WRITE: Final = "users.write"
ADMIN: Final = "users.admin"

_log: Final = logging.getLogger("userservice.auth")
_Guarded: TypeAlias = Callable[[Any, Context, str, Principal], Awaitable[Any]]
_CHALLENGE: Final = 'Bearer realm="userservice"'


def _unauthenticated(message: str, reason: str, error: str | None = None) -> Rejection:
    """Return an UNAUTHENTICATED rejection with the bearer challenge, naming error if given."""
    challenge = _CHALLENGE if error is None else f'{_CHALLENGE}, error="{error}"'
    return rejection(
        grpc.StatusCode.UNAUTHENTICATED,
        message,
        reason,
        headers=[("www-authenticate", challenge)],
    )


_MISSING: Final = _unauthenticated("missing bearer token", "TOKEN_MISSING")
_INVALID: Final = _unauthenticated("invalid bearer token", "TOKEN_INVALID", "invalid_token")
_EXPIRED: Final = _unauthenticated("bearer token expired", "TOKEN_EXPIRED", "invalid_token")
_WITHDRAWN: Final = _unauthenticated(
    "bearer token no longer valid", "KEY_WITHDRAWN", "invalid_token"
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


_AMBIGUOUS: Final = _unauthenticated(
    "more than one authorization header", "TOKEN_INVALID", "invalid_request"
)


def _authorizations(metadata: Any) -> list[Any]:
    """Return the values of every authorization header: more than one is refused."""
    # One pass over the metadata for both questions (how many, and the token).
    return [item[1] for item in metadata or () if item[0] == "authorization"]


def _bearer(value: Any) -> str | None:
    """Return the token of an authorization header value, None if it is not a bearer one."""
    if not isinstance(value, str) or len(value) < 8 or value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


class _OpenStream:
    """One stream under auth: its token, the instant that token ends, the task serving it."""

    __slots__ = ("ending", "ends_at", "task", "token")

    def __init__(self, task: asyncio.Task[Any], token: str, ends_at: float) -> None:
        self.task = task
        self.token = token
        self.ends_at = ends_at
        self.ending: Rejection | None = None

    def end(self, ending: Rejection) -> None:
        """Cancel the stream's task (once); its guard turns that into the ending's status."""
        if self.ending is None:
            self.ending = ending
            self.task.cancel()


def _abort_under(error: BaseException) -> grpc.aio.AbortError | None:
    """Return the abort an exception interrupted, if the call had already been aborted."""
    seen: BaseException | None = error.__context__
    while seen is not None:
        if isinstance(seen, grpc.aio.AbortError):
            return seen
        seen = seen.__context__
    return None


class AuthInterceptor(WrappingInterceptor):
    """Verifies the bearer token and the method's scope before the call reaches the handler.

    Streams also end when their token does (expiry, or a withdrawn signing key).
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        public: MethodMatcher,
        policies: Mapping[str, MethodPolicy] = METHODS,
    ) -> None:
        """Serve public methods (matched or declared) without a token; others need their scope."""
        super().__init__()
        self._verifier = verifier
        self._verify = verifier.verify
        self._cached = verifier.cached
        self._public = public
        self._policies = policies
        self._streams: set[_OpenStream] = set()
        verifier.keys.on_change(self._keys_changed)

    def _keys_changed(self) -> None:
        # Rare (a key rotation), so every open stream is re-checked here, on the loop: the
        # verifier's cache, emptied by the change, makes a token shared by streams cost once.
        still_valid = self._verifier.still_valid
        now = time.time()
        for stream in list(self._streams):
            if not still_valid(stream.token):
                stream.end(_EXPIRED if now >= stream.ends_at else _WITHDRAWN)

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour behind the token and scope checks (None for public methods)."""
        policy = self._policies.get(method)
        if self._public.matches(method) or (policy is not None and policy.public):
            return None
        scope = None if policy is None else policy.scope
        denied = _UNLISTED if scope is None else _insufficient(scope)
        verify, cached = self._verify, self._cached
        guarded = None if kind == UNARY else self._until_token_ends(behaviour)

        async def authorized(request: Any, context: Context) -> Any:
            # A proxy may have checked another authorization header than the one we would.
            values = _authorizations(invocation_metadata(context))
            if len(values) > 1:
                await _AMBIGUOUS.abort(context)
            token = _bearer(values[0]) if values else None
            if token is None:
                await _MISSING.abort(context)
            principal = cached(token)
            if principal is None:
                try:
                    principal = await verify(token)
                except jwt.InvalidTokenError as error:
                    _log.debug("bearer token rejected: %s", error, extra={"method": method})
                    await _INVALID.abort(context)
            PRINCIPAL.set(principal.subject)
            SCOPES.set(principal.scopes)
            if scope is None or scope not in principal.scopes:
                await denied.abort(context)
            if guarded is None:
                return await behaviour(request, context)
            return await guarded(request, context, token, principal)

        return authorized

    def _until_token_ends(self, behaviour: Behaviour) -> _Guarded:
        """Return behaviour run as a stream that ends when its token does."""
        streams = self._streams
        leeway = self._verifier.leeway

        async def guarded(request: Any, context: Context, token: str, principal: Principal) -> Any:
            task = asyncio.current_task()
            if task is None:  # pragma: no cover - grpc.aio always runs a call in a task
                return await behaviour(request, context)
            # exp plus the leeway: the instant the verifier itself stops accepting the token.
            stream = _OpenStream(task, token, principal.expires_at + leeway)
            loop = asyncio.get_running_loop()
            timer = loop.call_at(loop.time() + (stream.ends_at - time.time()), stream.end, _EXPIRED)
            streams.add(stream)
            try:
                response = await behaviour(request, context)
            except asyncio.CancelledError as error:
                if stream.ending is None:
                    raise  # the peer's cancel or deadline, not ours
                task.uncancel()
                await _end(context, stream.ending, error)
            finally:
                timer.cancel()
                streams.discard(stream)
            if stream.ending is not None:
                # The handler swallowed the cancellation: the stream still ends as it must.
                task.uncancel()
                await _end(context, stream.ending, None)
            return response

        return guarded


async def _end(context: Context, ending: Rejection, error: BaseException | None) -> NoReturn:
    """End the call with ending, unless the cancellation interrupted an abort already under way.

    The status follows whatever the stream had already handed to grpc: a message that flow
    control holds (a slow reader) is delivered first, and the abort waits for it.
    """
    aborted = None if error is None else _abort_under(error)
    if aborted is not None:
        # grpc.aio sends the status of the first abort and requires that very exception back.
        raise aborted
    try:
        await ending.abort(context)
    except grpc.aio.AbortError:
        raise
    except grpc.aio.UsageError as failure:
        # The handler's own abort was still sending its status (waiting for a slow reader)
        # when the token ended: that status stands, and this task has nothing left to do.
        raise asyncio.CancelledError from failure
    except Exception as failure:
        if is_batch_error(failure):
            # The status could not be sent: the peer left before taking what was in flight.
            raise asyncio.CancelledError from failure
        raise
