"""The chain applied when handlers are registered, not on every call.

Passed as ``grpc.aio.server(interceptors=[...])``, an interceptor costs grpc.aio a coroutine,
a continuation and a handler lookup on every call, even when it returns a cached handler.
Here each method's handler is wrapped in the chain once, as servicers register: grpc.aio then
finds the wrapped handler directly (grpc.experimental.wrap_server_method_handler does the same
for one handler). The layers stay what they are; only when they are applied changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from userservice.interceptors.handlers import Handler, WrappingInterceptor


class InterceptedRegistrar:
    """Stands in for a grpc.aio.Server while servicers register, wrapping each method once."""

    def __init__(self, server: grpc.aio.Server, chain: WrappingInterceptor) -> None:
        """Register on server, with every method handler wrapped by chain."""
        self._server = server
        self._chain = chain

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers whose method handlers come out wrapped."""
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(handler, self._chain) for handler in handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        """Register a service's handlers (grpc's fast path), each wrapped now."""
        wrapped = {
            name: self._chain.wrapped_handler(f"/{service_name}/{name}", handler)
            for name, handler in method_handlers.items()
        }
        self._server.add_registered_method_handlers(service_name, wrapped)


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose lookups return the chain-wrapped handler, built once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler, chain: WrappingInterceptor) -> None:
        self._inner = inner
        self._chain = chain
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._chain.wrapped_handler(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
