"""Load on uvloop for one scenario; measures the server's CPU over the same timed window.

Commands, each printing one JSON object on stdout:

- `load --method get|create|list`: closed-loop unary calls, `--concurrency` in flight over
  `--channels` connections, a warm-up, then a timed window;
- `export --count N`: one StreamUsers call, read until N users arrived, then cancelled;
- `import --count N`: one ImportUsers call of N prebuilt users;
- `watch --watchers W --count N`: W WatchUsers streams from now on, then N CreateUser calls
  (`--concurrency` in flight); deliveries/s (W x N events) until every watcher has all N;
- `startup --target`: prints `READY`, then polls until the target listens and health Check
  says SERVING, and prints when (time.monotonic(), comparable with the harness's clock).

The server's CPU is that of the process tree under `--server-pid` (a `--workers` parent and
its workers). Every call sends `authorization: Bearer $BENCH_TOKEN` when that is set.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks._proc import machine_busy_seconds, process_tree, tree_cpu_seconds
from user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

Metadata = tuple[tuple[str, str], ...]
if TYPE_CHECKING:
    # The async stub exists only in the generated type stubs.
    Stub = user_service_pb2_grpc.UserServiceAsyncStub
BEARER_ENV = "BENCH_TOKEN"


@dataclass
class _Counters:
    ok: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] | None = None
    stop: bool = False


def _metadata(token: str) -> Metadata | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _channel(target: str) -> grpc.aio.Channel:
    # Channels with identical arguments share one TCP connection through gRPC's global
    # subchannel pool; a local pool gives each channel its own connection (and with
    # `--workers`, the kernel a connection to place on each worker).
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _lines(path: str) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line] if path else []


def _unary_call(args: argparse.Namespace, metadata: Metadata | None) -> Callable[[Stub], Any]:
    """Return what one call does: the same requests go to the floor and the service."""
    if args.method == "get":
        ids = itertools.cycle(_lines(args.user_ids_file) or [args.user_id])
        return lambda stub: stub.GetUser(
            user_service_pb2.GetUserRequest(id=next(ids)), metadata=metadata, timeout=10
        )
    if args.method == "list":
        tokens = itertools.cycle(_lines(args.page_tokens_file) or [""])
        return lambda stub: stub.ListUsers(
            user_service_pb2.ListUsersRequest(page_size=args.page_size, page_token=next(tokens)),
            metadata=metadata,
            timeout=10,
        )
    numbers = itertools.count()
    return lambda stub: stub.CreateUser(
        user_service_pb2.CreateUserRequest(user=_new_user(args.email_prefix, next(numbers))),
        metadata=metadata,
        timeout=10,
    )


def _new_user(prefix: str, number: int) -> user_pb2.User:
    return user_pb2.User(
        email=f"{prefix}-{number}@bench.example",
        display_name=f"Bench User {number}",
        role=user_pb2.USER_ROLE_VIEWER,
    )


async def _worker(stub: Stub, call: Callable[[Stub], Awaitable[Any]], counters: _Counters) -> None:
    while not counters.stop:
        started = time.perf_counter()
        try:
            await call(stub)
        except grpc.aio.AioRpcError as error:
            counters.errors += 1
            name = error.code().name
            counters.error_codes[name] = counters.error_codes.get(name, 0) + 1
        else:
            counters.ok += 1
            if counters.latencies is not None:
                counters.latencies.append(time.perf_counter() - started)


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class _Meter:
    """Server, client and machine CPU between start() and stop()."""

    def __init__(self, server_pid: int) -> None:
        self._root = server_pid
        self._pids: list[int] = []
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        # The tree is taken once, at the start: workers exist by then.
        self._pids = process_tree(self._root)
        self._each0 = [tree_cpu_seconds([pid]) for pid in self._pids]
        self._server0 = sum(self._each0)
        self._machine0 = machine_busy_seconds()
        self._client0 = resource.getrusage(resource.RUSAGE_SELF)
        self._started = time.perf_counter()

    def stop(self, operations: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._started
        # A process that exited meanwhile reads 0: count it as no CPU, not negative.
        each = [
            max(0.0, tree_cpu_seconds([pid]) - before)
            for pid, before in zip(self._pids, self._each0, strict=True)
        ]
        server = sum(each)
        machine = machine_busy_seconds() - self._machine0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        client = (usage.ru_utime + usage.ru_stime) - (
            self._client0.ru_utime + self._client0.ru_stime
        )
        # Whatever else ran on the machine in the window: the noise this run competed with.
        background = max(0.0, machine - server - client)
        return {
            "operations": operations,
            "seconds": elapsed,
            "per_s": operations / elapsed,
            "server_processes": len(self._pids),
            # Per process (the parent first): shows whether workers shared the load.
            "server_cores_by_process": [cpu / elapsed for cpu in each],
            "server_cpu_s": server,
            "server_cpu_us_per_op": server / operations * 1e6 if operations else None,
            "server_cores": server / elapsed,
            "client_cpu_us_per_op": client / operations * 1e6 if operations else None,
            "client_cores": client / elapsed,
            "background_cores": background / elapsed,
        }


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then count completed calls and server CPU over exactly the timed window."""
    channels = [_channel(args.target) for _ in range(args.channels)]
    try:
        stubs = [user_service_pb2_grpc.UserServiceStub(channel) for channel in channels]
        call = _unary_call(args, _metadata(args.token))
        for stub in stubs:
            # One checked call per channel first: a misconfigured target fails loudly
            # with its status instead of producing a run of errors.
            await call(stub)
        counters = _Counters()
        tasks = [
            asyncio.create_task(_worker(stubs[i % len(stubs)], call, counters))
            for i in range(args.concurrency)
        ]
        await asyncio.sleep(args.warmup)
        meter = _Meter(args.server_pid)
        meter.start()
        ok0, errors0 = counters.ok, counters.errors
        counters.latencies = []
        await asyncio.sleep(args.seconds)
        result = meter.stop(counters.ok - ok0)
        errors = counters.errors - errors0
        latencies, counters.latencies = counters.latencies, None
        counters.stop = True
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    result.update(
        errors=errors,
        error_codes=counters.error_codes,
        # Every completed call, warm-up and probes included: the denominator for costs
        # that cannot be cut to the window, such as bytes of access log written.
        total_calls=counters.ok + len(stubs),
        latency_p50_ms=_quantile(latencies, 0.50) * 1e3,
        latency_p99_ms=_quantile(latencies, 0.99) * 1e3,
    )
    return result


async def export(args: argparse.Namespace) -> dict[str, Any]:
    """Read `--count` users from one StreamUsers call and cancel it; users/s over that."""
    async with _channel(args.target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        await channel.channel_ready()
        meter = _Meter(args.server_pid)
        meter.start()
        call = stub.StreamUsers(
            user_service_pb2.StreamUsersRequest(), metadata=_metadata(args.token), timeout=300
        )
        received = 0
        async for _ in call:
            received += 1
            if received >= args.count:
                break
        result = meter.stop(received)
        call.cancel()
    result["errors"] = 0 if received >= args.count else 1
    return result


async def import_users(args: argparse.Namespace) -> dict[str, Any]:
    """Send `--count` prebuilt users in one ImportUsers call; users/s until its answer."""
    requests = [
        user_service_pb2.ImportUsersRequest(user=_new_user(args.email_prefix, number))
        for number in range(args.count)
    ]
    async with _channel(args.target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        await channel.channel_ready()
        meter = _Meter(args.server_pid)
        meter.start()
        answer = await stub.ImportUsers(iter(requests), metadata=_metadata(args.token), timeout=600)
        result = meter.stop(args.count)
    result["created"] = answer.created_count
    result["errors"] = args.count - answer.created_count
    return result


async def _watch_one(stub: Stub, metadata: Metadata | None, count: int) -> int:
    call = stub.WatchUsers(user_service_pb2.WatchUsersRequest(), metadata=metadata, timeout=300)
    await call.initial_metadata()  # established: the server has begun the stream
    received = 0
    try:
        async for response in call:
            if response.sequence:  # not a progress marker
                received += 1
                if received >= count:
                    break
    finally:
        call.cancel()
    return received


async def watch(args: argparse.Namespace) -> dict[str, Any]:
    """W watchers from now on, then N creates; deliveries/s until every watcher has all N."""
    metadata = _metadata(args.token)
    async with _channel(args.target) as watch_channel, _channel(args.target) as write_channel:
        watch_stub = user_service_pb2_grpc.UserServiceStub(watch_channel)
        write_stub = user_service_pb2_grpc.UserServiceStub(write_channel)
        watchers = [
            asyncio.ensure_future(_watch_one(watch_stub, metadata, args.count))
            for _ in range(args.watchers)
        ]
        # Every stream established, and a moment for the server to attach it to its feed:
        # an event committed before that would not be "from now on" for it.
        await asyncio.sleep(0.5)
        numbers = iter(range(args.count))

        async def writer() -> None:
            for number in numbers:
                request = user_service_pb2.CreateUserRequest(
                    user=_new_user(args.email_prefix, number)
                )
                await write_stub.CreateUser(request, metadata=metadata, timeout=10)

        meter = _Meter(args.server_pid)
        meter.start()
        await asyncio.gather(*(writer() for _ in range(args.concurrency)))
        received = await asyncio.gather(*watchers)
        result = meter.stop(sum(received))
    result["errors"] = sum(args.count - r for r in received)
    return result


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def startup(args: argparse.Namespace) -> dict[str, Any]:
    """Print READY, then return the moments the target listened and said SERVING."""
    port = int(args.target.rpartition(":")[2])
    print("READY", flush=True)
    deadline = time.monotonic() + args.timeout
    # Raw connects until the port is bound: a gRPC channel would back off between attempts
    # and add its back-off to the figure.
    while not _listening(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{args.target} did not listen within {args.timeout:.0f} s")
        await asyncio.sleep(0.002)
    listening = time.monotonic()
    async with _channel(args.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            answer = await health.Check(
                health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True
            )
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args.target} was not SERVING within {args.timeout:.0f} s")
            await asyncio.sleep(0.002)
    return {"listening_at": listening, "serving_at": time.monotonic()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    load_cmd = commands.add_parser("load", help="timed unary load")
    load_cmd.add_argument("--method", choices=("get", "create", "list"), default="get")
    load_cmd.add_argument("--user-id", default="019b7a4e-6c2f-7d3e-8f1a-2b3c4d5e6f70")
    load_cmd.add_argument("--user-ids-file", default="", help="GetUser ids, one a line, cycled")
    load_cmd.add_argument("--page-tokens-file", default="", help="ListUsers tokens, cycled")
    load_cmd.add_argument("--page-size", type=int, default=50)
    load_cmd.add_argument("--concurrency", type=int, default=64)
    load_cmd.add_argument("--channels", type=int, default=2)
    load_cmd.add_argument("--warmup", type=float, default=1.0)
    load_cmd.add_argument("--seconds", type=float, default=3.0)
    export_cmd = commands.add_parser("export", help="one StreamUsers call")
    watch_cmd = commands.add_parser("watch", help="watchers, then creates")
    watch_cmd.add_argument("--watchers", type=int, default=16)
    watch_cmd.add_argument("--concurrency", type=int, default=8, help="creates in flight")
    import_cmd = commands.add_parser("import", help="one ImportUsers call")
    for command in (export_cmd, import_cmd, watch_cmd):
        command.add_argument("--count", type=int, default=100_000)
    for command in (load_cmd, import_cmd, watch_cmd):
        command.add_argument("--email-prefix", default="bench", help="new users' emails")
    for command in (load_cmd, export_cmd, import_cmd, watch_cmd):
        command.add_argument("--server-pid", type=int, required=True, help="process to meter")
    startup_cmd = commands.add_parser("startup", help="time until health SERVING")
    startup_cmd.add_argument("--timeout", type=float, default=60.0)
    for command in (load_cmd, export_cmd, import_cmd, watch_cmd, startup_cmd):
        command.add_argument("--target", required=True, help="127.0.0.1:PORT")
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]] = {
    "load": load,
    "export": export,
    "import": import_users,
    "watch": watch,
    "startup": startup,
}


def main(argv: list[str] | None = None) -> None:
    """Run one command on uvloop and print its result as JSON on stdout."""
    args = _parser().parse_args(argv)
    # Read from the environment so the token never shows in the process list.
    args.token = os.environ.get(BEARER_ENV, "")
    if not args.target.startswith("127.0.0.1:"):
        sys.exit("benchmarks.loadgen only targets 127.0.0.1")
    try:
        result = uvloop.run(_COMMANDS[args.command](args))
    except grpc.aio.AioRpcError as error:
        sys.exit(f"{args.command} failed: {error.code().name}: {error.details()}")
    except TimeoutError as error:
        sys.exit(f"{args.command} failed: {error}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
