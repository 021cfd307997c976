"""Bare grpc.aio server: the floor every scenario is compared with.

It answers from memory (no interceptors, storage or logging): GetUser and CreateUser return
a prebuilt User, ListUsers a prebuilt page of 50, StreamUsers streams one prebuilt message
until the client stops reading, ImportUsers receives and counts the messages. Health Check
answers SERVING once the server has started, so start-up is timed the same way as the full
service's.

With `--store URL` (sqlite:///path or postgresql://...) it is a storage floor instead: every
call runs the query the service's store runs for it (benchmarks/floors.py) and builds the
response from the rows; `--page-tokens` and `--page-after-ids` (two files, line for line) say
which id each page token the bench sends resumes after.

Run as `python -m benchmarks.bare_server --port N [--uvloop] [--store URL]`; prints
`LISTENING <port>` once it accepts calls (port 0 picks a free port) and stops on SIGTERM or
SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

# Field-for-field the shape the real service returns, so serialization costs match.
_CREATED = Timestamp(seconds=1_767_225_600, nanos=123_456_000)
_USER = user_pb2.User(
    id="019b7a4e-6c2f-7d3e-8f1a-2b3c4d5e6f70",
    email="bench@example.com",
    display_name="Bench User",
    role=user_pb2.USER_ROLE_VIEWER,
    create_time=_CREATED,
    update_time=_CREATED,
    etag='W/"5f2b9c1e8a7d4c3b"',
)
_GET = user_service_pb2.GetUserResponse(user=_USER)
_CREATE = user_service_pb2.CreateUserResponse(user=_USER)
_PAGE = user_service_pb2.ListUsersResponse(
    users=[_USER] * 50,
    # As long as the real service's signed keyset token.
    next_page_token="e" * 130,
)
_STREAMED = user_service_pb2.StreamUsersResponse(user=_USER)
# Far more than any scenario reads; the client cancels once it has counted its users.
_STREAM_LIMIT = 10_000_000

Context = grpc.aio.ServicerContext[Any, Any]


class BareUserService(user_service_pb2_grpc.UserServiceServicer):
    """Answers from prebuilt messages with no work beyond what grpc.aio itself does."""

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: Context
    ) -> user_service_pb2.GetUserResponse:
        """Return the same User for any id."""
        return _GET

    async def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: Context
    ) -> user_service_pb2.CreateUserResponse:
        """Return the same User for any request."""
        return _CREATE

    async def ListUsers(
        self, request: user_service_pb2.ListUsersRequest, context: Context
    ) -> user_service_pb2.ListUsersResponse:
        """Return the same page of 50 for any position."""
        return _PAGE

    async def StreamUsers(
        self, request: user_service_pb2.StreamUsersRequest, context: Context
    ) -> AsyncIterator[user_service_pb2.StreamUsersResponse]:
        """Stream one prebuilt message until the client cancels."""
        for _ in range(_STREAM_LIMIT):
            yield _STREAMED

    async def ImportUsers(
        self, request_iterator: AsyncIterator[user_service_pb2.ImportUsersRequest], context: Context
    ) -> user_service_pb2.ImportUsersResponse:
        """Receive and count the messages; create nothing."""
        count = 0
        async for _ in request_iterator:
            count += 1
        return user_service_pb2.ImportUsersResponse(created_count=count)


def _after_ids(tokens: str, after_ids: str) -> dict[str, str]:
    if not tokens:
        return {}
    keys = Path(tokens).read_text().split()
    return dict(zip(keys, Path(after_ids).read_text().split(), strict=True))


class BareHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Health Check that is SERVING as soon as the server answers at all."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        """Report SERVING."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def serve(port: int, store_url: str = "", after_ids: dict[str, str] | None = None) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM or SIGINT; from store_url's rows if given."""
    # SO_REUSEPORT is on by default in gRPC: off, so a port clash fails loudly instead of
    # silently sharing traffic with some other server.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # The generated stub marks every RPC abstract; at runtime the missing ones answer
    # UNIMPLEMENTED, which is exactly the bare server's contract.
    store = None
    servicer: user_service_pb2_grpc.UserServiceServicer
    if store_url:
        # Imported only here: the in-memory floor's start-up time must not include the store.
        from benchmarks.floors import StoreUserService, open_store

        store = await open_store(store_url)
        servicer = StoreUserService(store, after_ids or {})  # type: ignore[abstract]
    else:
        servicer = BareUserService()  # type: ignore[abstract]
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(BareHealth(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"LISTENING {bound}", flush=True)
    await stop.wait()
    await server.stop(grace=1)
    if store is not None:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the server on the chosen event loop."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_server", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--store", default="", help="sqlite:///path or postgresql://... floor")
    parser.add_argument("--page-tokens", default="", help="page tokens, one a line")
    parser.add_argument("--page-after-ids", default="", help="the id each token resumes after")
    args = parser.parse_args(argv)
    after_ids = _after_ids(args.page_tokens, args.page_after_ids)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port, args.store, after_ids))


if __name__ == "__main__":
    main()
