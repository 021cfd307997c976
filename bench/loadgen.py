"""Closed-loop GetUser load on uvloop; measures the server's CPU over the same timed window.

`python -m bench.loadgen load ...` prints one JSON object with the window's results;
`python -m bench.loadgen seed ...` creates the user the full configuration serves.
Both send `authorization: Bearer $BENCH_TOKEN` when that variable is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop

from bench._proc import cpu_seconds, machine_busy_seconds
from user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

Metadata = tuple[tuple[str, str], ...]
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
    # subchannel pool; a local pool gives each channel its own connection.
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


async def _worker(
    stub: user_service_pb2_grpc.UserServiceAsyncStub,
    request: user_service_pb2.GetUserRequest,
    metadata: Metadata | None,
    counters: _Counters,
) -> None:
    while not counters.stop:
        started = time.perf_counter()
        try:
            await stub.GetUser(request, metadata=metadata, timeout=10)
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


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then count completed calls and server CPU over exactly the timed window."""
    channels = [_channel(args.target) for _ in range(args.channels)]
    try:
        stubs = [user_service_pb2_grpc.UserServiceStub(channel) for channel in channels]
        request = user_service_pb2.GetUserRequest(id=args.user_id)
        metadata = _metadata(args.token)
        for stub in stubs:
            # One checked call per channel first: a misconfigured target fails loudly
            # with its status instead of producing a run of errors.
            await stub.GetUser(request, metadata=metadata, timeout=10, wait_for_ready=True)
        counters = _Counters()
        tasks = [
            asyncio.create_task(_worker(stubs[i % len(stubs)], request, metadata, counters))
            for i in range(args.concurrency)
        ]
        await asyncio.sleep(args.warmup)
        server_cpu0 = cpu_seconds(args.server_pid)
        machine0 = machine_busy_seconds()
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        ok0, errors0 = counters.ok, counters.errors
        counters.latencies = []
        started = time.perf_counter()
        await asyncio.sleep(args.seconds)
        elapsed = time.perf_counter() - started
        server_cpu1 = cpu_seconds(args.server_pid)
        machine1 = machine_busy_seconds()
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        ok1, errors1 = counters.ok, counters.errors
        latencies, counters.latencies = counters.latencies, None
        counters.stop = True
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    calls = ok1 - ok0
    client_cpu = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    server_cpu = server_cpu1 - server_cpu0
    # Whatever else ran on the machine in the window: the noise this run competed with.
    background = max(0.0, (machine1 - machine0) - server_cpu - client_cpu)
    return {
        "calls": calls,
        # Every completed call, warm-up and probes included: the denominator for costs
        # that cannot be cut to the window, such as bytes of access log written.
        "total_calls": counters.ok + len(stubs),
        "errors": errors1 - errors0,
        "error_codes": counters.error_codes,
        "seconds": elapsed,
        "calls_per_s": calls / elapsed,
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_call": server_cpu / calls * 1e6 if calls else None,
        "server_cores": server_cpu / elapsed,
        "client_cpu_us_per_call": client_cpu / calls * 1e6 if calls else None,
        "client_cores": client_cpu / elapsed,
        "background_cores": background / elapsed,
        "latency_p50_ms": _quantile(latencies, 0.50) * 1e3,
        "latency_p99_ms": _quantile(latencies, 0.99) * 1e3,
    }


async def seed(args: argparse.Namespace) -> dict[str, Any]:
    """Create one user (retrying while the server starts) and read it back."""
    metadata = _metadata(args.token)
    deadline = time.monotonic() + args.timeout
    async with _channel(args.target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        create = user_service_pb2.CreateUserRequest(
            user=user_pb2.User(email="bench@example.com", display_name="Bench User"),
            # Same key on every retry: a create that succeeded but whose answer was lost
            # returns the same user instead of ALREADY_EXISTS.
            request_id=str(uuid.uuid4()),
        )
        while True:
            try:
                created = await stub.CreateUser(create, metadata=metadata, timeout=5)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        got = await stub.GetUser(
            user_service_pb2.GetUserRequest(id=created.user.id), metadata=metadata, timeout=5
        )
    return {"user_id": got.user.id, "response_bytes": got.ByteSize()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    load_cmd = commands.add_parser("load", help="timed GetUser load")
    load_cmd.add_argument("--target", required=True, help="127.0.0.1:PORT")
    load_cmd.add_argument("--server-pid", type=int, required=True, help="process to meter")
    load_cmd.add_argument("--user-id", default="019b7a4e-6c2f-7d3e-8f1a-2b3c4d5e6f70")
    load_cmd.add_argument("--concurrency", type=int, default=64)
    load_cmd.add_argument("--channels", type=int, default=2)
    load_cmd.add_argument("--warmup", type=float, default=1.0)
    load_cmd.add_argument("--seconds", type=float, default=3.0)
    seed_cmd = commands.add_parser("seed", help="create the user to load")
    seed_cmd.add_argument("--target", required=True, help="127.0.0.1:PORT")
    seed_cmd.add_argument("--timeout", type=float, default=20.0)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one command on uvloop and print its result as JSON on stdout."""
    args = _parser().parse_args(argv)
    # Read from the environment so the token never shows in the process list.
    args.token = os.environ.get(BEARER_ENV, "")
    if not args.target.startswith("127.0.0.1:"):
        sys.exit("bench.loadgen only targets 127.0.0.1")
    command = load if args.command == "load" else seed
    try:
        result = uvloop.run(command(args))
    except grpc.aio.AioRpcError as error:
        sys.exit(f"{args.command} failed: {error.code().name}: {error.details()}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
