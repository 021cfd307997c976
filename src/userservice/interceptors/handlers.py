"""Handler plumbing shared by the interceptors: one behaviour shape and a cached wrapper.

grpc.aio accepts four handler kinds and, for streamed responses, two styles: an async
generator, or a coroutine that calls ``context.write`` (the health Watch is one; see
grpc#28728). Every behaviour is normalised here to a coroutine ``(request, context)``
that returns the response (unary responses) or None after writing (streamed responses),
so each interceptor writes one wrapper instead of eight.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NoReturn, TypeAlias, cast

import grpc

from userservice.rpc_context import Context as Context

# Strings, because grpc's runtime classes are not all subscriptable (only the stubs are).
Behaviour: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
MessageHook: TypeAlias = "Callable[[Any], Awaitable[None] | None]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

UNARY: Final = "unary"
CLIENT_STREAM: Final = "client_stream"
SERVER_STREAM: Final = "server_stream"
BIDI_STREAM: Final = "bidi_stream"

_KINDS: Final = {
    (False, False): UNARY,
    (True, False): CLIENT_STREAM,
    (False, True): SERVER_STREAM,
    (True, True): BIDI_STREAM,
}
_FACTORIES: Final[dict[str, Callable[..., Handler]]] = {
    UNARY: grpc.unary_unary_rpc_method_handler,
    CLIENT_STREAM: grpc.stream_unary_rpc_method_handler,
    SERVER_STREAM: grpc.unary_stream_rpc_method_handler,
    BIDI_STREAM: grpc.stream_stream_rpc_method_handler,
}
# grpc.aio reports a failed read or write batch as this error of its private cygrpc module;
# matched by name rather than imported, so no private module is imported.
_BATCH_ERROR: Final = ("grpc._cython.cygrpc", "ExecuteBatchError")
# A write fails as soon as the peer resets the stream; the cancellation itself reaches the
# call a few event-loop turns later, and on a loaded host (a soak, a CPU-starved pod) more
# than 100 ms later: a SyncUsers stream whose client went away was then logged as an
# unhandled error. This long at most is waited for it; only a failed batch pays the wait.
_SETTLE_SECONDS: Final = 1.0
_log: Final = logging.getLogger(__name__)
# Handlers are few (one per method), but a generic handler may mint new ones per call:
# past this many entries the cache starts over rather than grow without bound.
_CACHE_LIMIT: Final = 4096


def kind_of(handler: Handler) -> str:
    """Return unary, client_stream, server_stream or bidi_stream."""
    return _KINDS[handler.request_streaming, handler.response_streaming]


def _original(handler: Handler, kind: str) -> Callable[..., Any]:
    behaviour = {
        UNARY: handler.unary_unary,
        CLIENT_STREAM: handler.stream_unary,
        SERVER_STREAM: handler.unary_stream,
        BIDI_STREAM: handler.stream_stream,
    }[kind]
    if behaviour is None:
        raise TypeError(f"{kind} handler without a behaviour")
    return behaviour


def normalised(handler: Handler) -> Behaviour:
    """Return the handler's behaviour as a coroutine function of the one shape above."""
    kind = kind_of(handler)
    behaviour = _original(handler, kind)
    if inspect.iscoroutinefunction(behaviour):
        # A coroutine is already the shape: grpc.aio treats a streaming one as writer-style.
        return behaviour
    if kind in (UNARY, CLIENT_STREAM):
        return _awaiting(behaviour)
    return _writing(behaviour)


def _awaiting(behaviour: Callable[..., Any]) -> Behaviour:
    async def awaiting(request: Any, context: Context) -> Any:
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return awaiting


def _writing(behaviour: Callable[..., Any]) -> Behaviour:
    async def writing(request: Any, context: Context) -> None:
        result = behaviour(request, context)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return
        if not hasattr(result, "__aiter__"):
            for message in result:
                await _write(context, message)
            return
        iterator: AsyncIterator[Any] = aiter(result)
        write = context.write
        try:
            # A try per write rather than a _write() coroutine per message: a stream of 100k
            # users pays one frame less each (a try costs nothing until it catches). A batch
            # failure the generator raises (a read, in a bidi stream) is judged as recovery
            # would judge it: the same outcome.
            async for message in iterator:
                try:
                    await write(message)
                except Exception as error:
                    await write_failed(context, error)
        except Exception as error:
            if await peer_ended(context, error):
                raise asyncio.CancelledError from error
            raise
        finally:
            # Close the generator now, on this task, so its finally blocks run before the
            # status is sent, instead of whenever the garbage collector finds it.
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    return writing


def is_batch_error(error: BaseException) -> bool:
    """Return whether error is grpc.aio's ExecuteBatchError (a read or write batch failed)."""
    kind = type(error)
    return (kind.__module__, kind.__name__) == _BATCH_ERROR


def call_ended(context: Context) -> bool:
    """Return whether the call was cancelled or its deadline has passed."""
    remaining = context.time_remaining()
    return bool(context.cancelled()) or (remaining is not None and remaining <= 0)


async def peer_ended(context: Context, error: BaseException) -> bool:
    """Return whether error is a batch failure on a call the peer ended (cancel or deadline).

    Waits up to _SETTLE_SECONDS for the cancellation to land; any other batch failure is a
    real error and must be reported as one.
    """
    if not is_batch_error(error):
        return False
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _SETTLE_SECONDS
    while not call_ended(context):
        if loop.time() >= give_up:
            return False
        await asyncio.sleep(0.005)
    return True


async def _write(context: Context, message: Any) -> None:
    try:
        await context.write(message)
    except Exception as error:
        await write_failed(context, error)


async def write_failed(context: Context, error: Exception) -> NoReturn:
    """Raise what a failed response write means: the stream is gone, or error itself.

    A failed send batch means the transport no longer carries this stream (the peer reset
    it, the connection dropped): no status can reach the client any more, and nothing in our
    code failed. The cancellation that explains it usually lands within _SETTLE_SECONDS; where
    it does not (seen under fault-injecting load), the call still ends as cancelled, with a
    warning line instead of an unhandled-error report.
    """
    if not is_batch_error(error):
        raise error
    if not await peer_ended(context, error):
        _log.warning("a response write failed on a stream grpc has not reported ended: %s", error)
    # grpc.aio treats CancelledError as a cancelled call: no status, a debug line.
    raise asyncio.CancelledError from error


class RequestStream:
    """A request stream whose messages pass, in one loop, through every layer's hook in order.

    Each layer that acts per request message (counting, pacing, the malformed check) adds a
    hook rather than an async generator of its own: every generator in a chain costs a
    resumption per message, and a bulk import sends 100k of them. Hooks run outermost layer
    first, the order the generators ran in; a hook returns None, or an awaitable when it has
    to wait (for tokens) or end the call (a rejection raises out of the await).
    """

    __slots__ = ("_hooks", "_source")

    def __init__(self, source: AsyncIterator[Any], hooks: tuple[MessageHook, ...]) -> None:
        """Iterate source, running hooks on each message before it is handed on."""
        self._source = source
        self._hooks = hooks

    def __aiter__(self) -> AsyncIterator[Any]:
        """Return the one pass over the source."""
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        hooks = self._hooks
        async for message in self._source:
            for hook in hooks:
                pending = hook(message)
                if pending is not None:
                    await pending
            yield message


def with_hook(requests: Any, hook: MessageHook) -> RequestStream:
    """Return requests with hook run on each message after the hooks already on it."""
    if isinstance(requests, RequestStream):
        return RequestStream(requests._source, (*requests._hooks, hook))
    return RequestStream(requests, (hook,))


class _HookedReads:
    """A servicer context whose read() runs hook on each message: with_hook for read() handlers.

    Everything else is the real context's. EOF is handed on without the hook, as a request
    stream ends without yielding one.
    """

    __slots__ = ("_context", "_hook")

    def __init__(self, context: Context, hook: MessageHook) -> None:
        """Read from context, running hook on each message before handing it over."""
        self._context = context
        self._hook = hook

    def __getattr__(self, name: str) -> Any:
        """Everything else is the real context's."""
        return getattr(self._context, name)

    async def read(self) -> Any:
        """Return the next message once its hook has run (and what it returned, if awaited)."""
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            pending = self._hook(message)
            if pending is not None:
                await pending
        return message


def hook_messages(requests: Any, context: Context, hook: MessageHook) -> tuple[Any, Context]:
    """Return requests and context with hook run on each request message, in either aio style."""
    if hasattr(requests, "__aiter__"):
        requests = with_hook(requests, hook)
    return requests, cast(Context, _HookedReads(context, hook))


def rebuild(handler: Handler, behaviour: Behaviour, request_deserializer: Any) -> Handler:
    """Return a handler of the same kind and response codec that runs behaviour."""
    return _FACTORIES[kind_of(handler)](
        behaviour,
        request_deserializer=request_deserializer,
        response_serializer=handler.response_serializer,
    )


class WrappingInterceptor(grpc.aio.ServerInterceptor, abc.ABC):
    """Base interceptor: wraps each method's behaviour once and reuses the wrapped handler.

    All per-call work happens inside the wrapped behaviour, never in intercept_service,
    so an outer interceptor's wrapper sees every exception an inner one raises.
    """

    def __init__(self) -> None:
        """Start with an empty cache of wrapped handlers."""
        self._wrapped: dict[tuple[str, int], tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        """Return the next handler, wrapped by this interceptor (cached per method)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        key = (method, id(handler))
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrapped_handler(method, handler)
        if len(self._wrapped) >= _CACHE_LIMIT:
            self._wrapped.clear()
        # The entry holds the handler itself, so its id cannot be reused while cached.
        self._wrapped[key] = (handler, wrapped)
        return wrapped

    def wrapped_handler(self, method: str, handler: Handler) -> Handler:
        """Return handler with this interceptor's behaviour and deserializer around it."""
        original = normalised(handler)
        behaviour = self.wrap(method, kind_of(handler), original)
        deserializer = self.wrap_deserializer(method, handler.request_deserializer)
        if behaviour is None and deserializer is handler.request_deserializer:
            return handler
        return rebuild(handler, behaviour or original, deserializer)

    def wrap_deserializer(self, method: str, deserializer: Any) -> Any:
        """Return the request deserializer to serve method with (by default, deserializer)."""
        return deserializer

    @abc.abstractmethod
    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return the per-call behaviour for method, or None to serve it untouched."""
