"""The server interceptor chain, outermost first: recovery, [tracing,] access log, auth, admission,
public stream admission, rate limit, decoding.

- Recovery is outermost so that nothing escapes it: a bug in the access log, in token
  verification or in the limiter becomes INTERNAL with a correlation id, like a bug in
  a handler.
- Tracing (only when OTEL_* turns it on, see observability/otel.py) comes next: its server
  span covers everything below, sees each call's final code, and is current while the access
  log writes its line, which therefore carries the trace id.
- The access log comes next so that every call is logged and measured with the code it
  really ended with, including calls that auth rejected, the limiter refused, or that
  recovery turned into INTERNAL.
- Auth runs before the rate limit so that buckets are per authenticated principal (a
  caller cannot spend someone else's budget by naming them), and so that a flood of
  unauthenticated calls is refused before it costs a bucket lookup (a Redis round trip
  when the limit is shared).
- Admission (the replica's limits on calls in progress and open streams) runs after auth,
  because the per-principal stream limit needs the principal, and because a call auth
  refuses does no work worth a slot: an anonymous flood cannot take the slots of
  authenticated callers. It runs before the rate limit so that a refused call costs no
  tokens (and no Redis round trip), and so that a stream paced by the limiter still
  holds its slot: it is open. Being inside the access log, every refusal is logged and
  counted with its code, which grpc's own ``maximum_concurrent_rpcs`` (kept only as a
  much higher backstop) cannot do.
- Public stream admission sits beside it: the streams of public methods (health Watch,
  reflection), which carry no token, have a budget of their own per peer host and in total,
  so an anonymous flood neither takes authenticated callers' stream slots nor reaches grpc's
  backstop; it is refused here, logged and counted. Public unary calls (health Check) are
  never refused: a probe must always get an answer.
- Decoding is innermost: it hands every handler a tolerant request deserializer and turns a
  message that did not parse into INVALID_ARGUMENT (MALFORMED_REQUEST) where the handler would
  have seen it. Inside auth, an unauthenticated caller's garbage is refused before it costs a
  warning; inside admission and the rate limit, a flood of it is limited like any other calls.
- Health checks and reflection skip auth, admission and the rate limit (probes and tooling carry no
  token and must not be throttled) but are still logged; only their streams are counted, by
  public stream admission. Each layer picks its methods with a matcher (PUBLIC_METHODS).

grpc.aio runs ``interceptors=[a, b]`` with ``a`` outermost, and pays for every entry on
every call (a coroutine and a handler lookup per layer). So, as go-grpc-middleware's
``ChainUnaryServer`` does, the layers are composed into one grpc interceptor: each layer
stays its own module and its own ``WrappingInterceptor`` (usable alone), and the composed
handler is built once per method and cached. The server applies it as servicers register
(``InterceptorChain.registrar``, registration.py), so grpc.aio runs no interceptor machinery
per call at all. All per-call work runs inside the wrapped behaviour, which is what lets
recovery see an exception raised inside auth.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from userservice.interceptors.admission import (
    AdmissionInterceptor,
    AdmissionLimits,
    PublicStreamAdmission,
    PublicStreamLimits,
)
from userservice.interceptors.auth import AuthInterceptor
from userservice.interceptors.auth.verifier import TokenVerifier
from userservice.interceptors.decoding import DecodingInterceptor
from userservice.interceptors.handlers import Behaviour, WrappingInterceptor
from userservice.interceptors.logging import AccessLogInterceptor
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.ratelimit.interceptor import RateLimitInterceptor
from userservice.interceptors.ratelimit.limiter import Limiter
from userservice.interceptors.ratelimit.local import LocalLimiter
from userservice.interceptors.recovery import RecoveryInterceptor
from userservice.interceptors.registration import InterceptedRegistrar

_log: Final = logging.getLogger("userservice.chain")
PUBLIC_METHODS: Final = ("grpc.health.v1.Health/*", "grpc.reflection.*")
"""Methods served without a token or a rate limit; only their streams have a budget (per peer)."""


class ComposedInterceptor(WrappingInterceptor):
    """Several layers run as one grpc interceptor, the first layer outermost."""

    def __init__(self, layers: Sequence[WrappingInterceptor]) -> None:
        """Compose layers, given outermost first."""
        super().__init__()
        self.layers = tuple(layers)

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Wrap behaviour in every layer that applies to method, innermost first."""
        wrapped_by_any = False
        for layer in reversed(self.layers):
            wrapped = layer.wrap(method, kind, behaviour)
            if wrapped is not None:
                behaviour, wrapped_by_any = wrapped, True
        return behaviour if wrapped_by_any else None

    def wrap_deserializer(self, method: str, deserializer: Any) -> Any:
        """Return deserializer as every layer wants it, innermost first."""
        for layer in reversed(self.layers):
            deserializer = layer.wrap_deserializer(method, deserializer)
        return deserializer


@dataclass(eq=False)
class InterceptorChain:
    """The layers in order, composed, and what they hold."""

    layers: Sequence[WrappingInterceptor]
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.composed = ComposedInterceptor(self.layers)

    def registrar(self, server: grpc.aio.Server) -> InterceptedRegistrar:
        """Return what servicers register on to have the chain applied once per method.

        The server itself is built without interceptors (see registration.py).
        """
        return InterceptedRegistrar(server, self.composed)

    async def aclose(self) -> None:
        """Release what the interceptors hold (the Redis connections), once the server stopped."""
        closers, self.closers = self.closers, []
        for close in closers:
            # One failing closer must not leave the others open.
            try:
                await close()
            except Exception as error:
                _log.error("closing an interceptor failed: %s: %s", type(error).__name__, error)


@dataclass(frozen=True, slots=True)
class RateLimitOptions:
    """The per-principal token bucket, and where it lives (this process, or a shared Redis)."""

    rps: float
    burst: int
    redis_url: str = ""
    fail_open: bool = True
    redis_timeout_seconds: float = 0.1


@dataclass(frozen=True, slots=True)
class ChainOptions:
    """What the layers of the chain are configured with; rate_limit None leaves it out."""

    admission: AdmissionLimits
    public_streams: PublicStreamLimits
    rate_limit: RateLimitOptions | None


async def build_chain(
    verifier: TokenVerifier, options: ChainOptions, tracing: WrappingInterceptor | None = None
) -> InterceptorChain:
    """Build the chain verifying tokens with verifier; start its keys (KeyFetchError if none).

    tracing is the server-span layer (observability/otel.py), when tracing is on.
    """
    public = MethodMatcher(PUBLIC_METHODS)
    access_log = AccessLogInterceptor()
    layers: list[WrappingInterceptor] = [RecoveryInterceptor()]
    if tracing is not None:
        layers.append(tracing)
    layers += [
        access_log,
        AuthInterceptor(verifier, public),
        AdmissionInterceptor(options.admission, public),
        PublicStreamAdmission(options.public_streams, public),
    ]
    closers = [_flusher(access_log.stderr.flush)]
    rate = options.rate_limit
    if rate is not None:
        limiter: Limiter
        if rate.redis_url:
            # Imported only when used: redis-py imports the OpenTelemetry SDK if it is installed,
            # which a service not using Redis (or not tracing) should not pay for.
            from userservice.interceptors.ratelimit.redis import RedisLimiter

            shared = RedisLimiter.from_url(
                rate.redis_url,
                rate.rps,
                rate.burst,
                fail_open=rate.fail_open,
                timeout=rate.redis_timeout_seconds,
            )
            closers.append(shared.aclose)
            # Surfaces an unreachable Redis in the startup log rather than at the first call.
            await shared.check()
            limiter = shared
        else:
            limiter = LocalLimiter(rate.rps, rate.burst)
        layers.append(RateLimitInterceptor(limiter, public, burst=rate.burst))
    layers.append(DecodingInterceptor())
    chain = InterceptorChain(layers, closers)
    try:
        # The first JWKS fetch: without keys no call could be served (KeyFetchError).
        await verifier.keys.start()
    except BaseException:
        await chain.aclose()
        raise
    chain.closers.append(verifier.keys.aclose)
    return chain


def _flusher(flush: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def flush_now() -> None:
        flush()

    return flush_now
