"""A service that calls another: user.v1.UserService GetUser and StreamUsers, served by calling
the real userservice through userservice.client with the propagation interceptors.

Each call the gateway makes carries what is left of its caller's deadline, its x-request-id
and trace context, and is cancelled when its caller gives up (docs/calling-services.md). A
failed downstream call is answered with downstream_status: the caller never sees the
userservice's own message, and a downstream INVALID_ARGUMENT becomes our INTERNAL. The caller's
token is forwarded, so the userservice authorizes the caller, not the gateway (and its
UNAUTHENTICATED or PERMISSION_DENIED is the caller's to fix: passed through). The gateway
runs the server chain's recovery and access log layers, which record each call in
userservice.rpc_context (a service cloned from userservice runs its whole chain).

Usage: .venv/bin/python examples/gateway.py --upstream localhost:50051 [--listen 127.0.0.1:50061]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc
from userservice.client import UserServiceClient
from userservice.client.downstream import downstream_status
from userservice.interceptors.chain import InterceptorChain
from userservice.interceptors.logging import AccessLogInterceptor
from userservice.interceptors.recovery import RecoveryInterceptor
from userservice.rpc_context import invocation_metadata, metadata_value, with_request_id

_log = logging.getLogger("gateway")
DEPENDENCY = "the user directory"
# The downstream codes our caller can act on: the id it asked for does not exist, and its own
# token (forwarded) is missing, expired or lacks a scope.
PASSTHROUGH: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.NOT_FOUND: "no such user",
    grpc.StatusCode.UNAUTHENTICATED: "a valid bearer token is required",
    grpc.StatusCode.PERMISSION_DENIED: "the token does not allow reading users",
}


def forwarded(context: Any) -> tuple[tuple[str, str], ...]:
    """Return the caller's authorization metadata, to call the userservice on its behalf."""
    authorization = metadata_value(invocation_metadata(context), "authorization")
    return (("authorization", authorization),) if authorization else ()


async def abort_for(context: Any, error: grpc.aio.AioRpcError) -> NoReturn:
    """End the call with the status downstream_status gives for a failed downstream call."""
    status = downstream_status(error, DEPENDENCY, passthrough=PASSTHROUGH)
    # The downstream's own words go to our log, never to our caller.
    _log.warning(
        "userservice call failed: %s %s", status.downstream_code.name, status.downstream_details
    )
    await context.abort(status.code, status.message, with_request_id(()))
    raise AssertionError("abort raises")


class Gateway(user_service_pb2_grpc.UserServiceServicer):
    """Serves GetUser and StreamUsers from the userservice client (the rest: UNIMPLEMENTED)."""

    def __init__(self, client: UserServiceClient) -> None:
        """Answer from client, a UserServiceClient made with propagate=True."""
        self.client = client

    async def GetUser(self, request: pb.GetUserRequest, context: Any) -> pb.GetUserResponse:
        """Return the userservice's answer for the same request."""
        try:
            # The client's own timeout, cut by the interceptors to what our caller has left.
            return await self.client.stub.GetUser(
                request, timeout=self.client.timeout, metadata=forwarded(context)
            )
        except grpc.aio.AioRpcError as error:
            await abort_for(context, error)

    async def StreamUsers(self, request: pb.StreamUsersRequest, context: Any) -> None:
        """Relay the userservice's stream; it is cancelled when our caller goes away."""
        call = self.client.stub.StreamUsers(request, metadata=forwarded(context))
        try:
            async for response in call:
                await context.write(response)
        except grpc.aio.AioRpcError as error:
            await abort_for(context, error)


def chain() -> InterceptorChain:
    """Return the server layers the gateway runs: recovery outermost, then the access log."""
    return InterceptorChain([RecoveryInterceptor(), AccessLogInterceptor()])


async def start(
    servicer: user_service_pb2_grpc.UserServiceServicer, listen: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, int]:
    """Start a server for servicer behind chain() on listen; return it and its port."""
    server = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, chain().registrar(server))
    port = server.add_insecure_port(listen)
    await server.start()
    return server, port


async def main(upstream: str, listen: str, channels: int) -> None:
    """Serve the gateway until SIGINT or SIGTERM."""
    async with UserServiceClient(upstream, propagate=True, channels=channels) as client:
        server, port = await start(Gateway(client), listen)
        print(f"gateway on port {port}, calling {upstream}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await server.stop(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", default="localhost:50051")
    parser.add_argument("--listen", default="127.0.0.1:50061")
    parser.add_argument("--channels", type=int, default=1)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(arguments.upstream, arguments.listen, arguments.channels))
