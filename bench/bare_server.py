"""Bare grpc.aio server: GetUser returns a constant User; no interceptors, storage or logging.

Run as `python -m bench.bare_server --port N [--uvloop]`; prints `LISTENING <port>` once
it accepts calls (port 0 picks a free port) and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

# Field-for-field the shape the real service returns, so serialization costs match.
_CREATED = Timestamp(seconds=1_767_225_600, nanos=123_456_000)
_RESPONSE = user_service_pb2.GetUserResponse(
    user=user_pb2.User(
        id="019b7a4e-6c2f-7d3e-8f1a-2b3c4d5e6f70",
        email="bench@example.com",
        display_name="Bench User",
        role=user_pb2.USER_ROLE_VIEWER,
        create_time=_CREATED,
        update_time=_CREATED,
        etag='W/"5f2b9c1e8a7d4c3b"',
    )
)


class BareUserService(user_service_pb2_grpc.UserServiceServicer):
    """Implements only GetUser, with no work beyond returning a prebuilt message."""

    async def GetUser(
        self,
        request: user_service_pb2.GetUserRequest,
        context: grpc.aio.ServicerContext[
            user_service_pb2.GetUserRequest, user_service_pb2.GetUserResponse
        ],
    ) -> user_service_pb2.GetUserResponse:
        """Return the same User for any id."""
        return _RESPONSE


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    # SO_REUSEPORT is on by default in gRPC: off, so a port clash fails loudly instead of
    # silently sharing traffic with some other server.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # The generated stub marks every RPC abstract; at runtime the missing ones answer
    # UNIMPLEMENTED, which is exactly the bare server's contract.
    servicer = BareUserService()  # type: ignore[abstract]
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"LISTENING {bound}", flush=True)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the server on the chosen event loop."""
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
