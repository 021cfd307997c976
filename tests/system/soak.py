"""A bounded soak of a real server: mixed load, the fuzzer, storage and Redis cut, restarts.

``make soak`` (``tests/system/soak.py --minutes 3``) starts ``userservice serve`` on a fresh
PostgreSQL database reached through a TCP proxy the soak controls, with the shared rate limiter's
Redis behind a second proxy, then for the whole run:

- several principals make well-formed calls of every RPC kind, and remember every write the
  server acknowledged (a create whose answer was lost is retried with its request id, AIP-155);
- one principal floods, so the rate limiter has someone to refuse;
- the wire fuzzer (``fuzz.py``) sends damaged requests at a low rate;
- every cycle, PostgreSQL is cut and restored, Redis is cut and restored, and the server is
  stopped with SIGTERM and started again.

At the end the server is restarted once more and every acknowledged write is read back. The run
ends with one summary line (calls by code, writes verified, restarts, peak RSS, PASS or FAIL) and
exits 1 on FAIL. It fails on: a status no caller should see (``UNKNOWN``, ``INTERNAL``, or any
code outside the documented set for the call), internals in a status message, a SIGTERM exit
other than 0, an ``ERROR`` line or a traceback in the server's log, a server that is not SERVING
again in time after a fault, or an acknowledged write that is missing or wrong. Everything it
starts listens on 127.0.0.1 and is stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import random
import signal
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.databases import POSTGRES_ADMIN_URL, REDIS_URL, fresh_postgres_database
from helpers.ports import free_port
from helpers.servers import suite_env
from helpers.tcp_proxy import TcpProxy
from helpers.tokens import bearer
from system import fuzz

from user.v1 import user_pb2, user_service_pb2_grpc
from user.v1 import user_service_pb2 as pb

CYCLE_SECONDS = 30.0  # one PostgreSQL cut, one Redis cut and one restart per cycle
CUT_SECONDS = 3.0
SERVING_WITHIN_SECONDS = 20.0
CALL_TIMEOUT = 5.0
MAX_RSS_MIB = 400
CHANNEL_OPTIONS = (
    # Reconnect quickly after a restart instead of grpc's default 1 s .. 120 s back-off.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
S = grpc.StatusCode
# What a well-formed call may end with while faults come and go: refused (rate limit,
# overload), unavailable (restart, storage or limiter down), out of time, a lost race, or
# CANCELLED by server.stop() for a call grpc accepted during the drain but the server never
# started (these callers do no client-side health checking; see docs/operations.md).
WELL_FORMED = frozenset(
    {S.OK, S.RESOURCE_EXHAUSTED, S.UNAVAILABLE, S.DEADLINE_EXCEEDED, S.ABORTED, S.CANCELLED}
)
FUZZED = fuzz.DOCUMENTED | {S.UNAVAILABLE, S.CANCELLED}
# A create may be retried with its request id after these: the write may or may not have happened.
RETRY_CREATE = frozenset(
    {S.UNAVAILABLE, S.DEADLINE_EXCEEDED, S.ABORTED, S.RESOURCE_EXHAUSTED, S.CANCELLED}
)


@dataclasses.dataclass
class Tally:
    """Calls by status code, and everything that breaks the promises above."""

    by_code: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    flooded: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    fuzzed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    violations: list[str] = dataclasses.field(default_factory=list)

    def record(
        self,
        what: str,
        code: grpc.StatusCode,
        details: str,
        allowed: frozenset[Any],
        counter: collections.Counter[str] | None = None,
    ) -> None:
        """Count one call; note it if its code is not allowed or its message leaks internals."""
        (self.by_code if counter is None else counter)[code.name] += 1
        leaked = [word for word in fuzz.LEAKS if word in details]
        if code not in allowed or leaked:
            self.violations.append(f"{what} -> {code.name} {details[:160]!r}")


@dataclasses.dataclass
class Ledger:
    """What the server acknowledged to one principal; None where a later write is in doubt."""

    users: dict[str, tuple[str, str | None]] = dataclasses.field(default_factory=dict)
    deleted: set[str] = dataclasses.field(default_factory=set)
    in_doubt: set[str] = dataclasses.field(default_factory=set)
    imported: set[str] = dataclasses.field(default_factory=set)

    @property
    def acknowledged(self) -> int:
        """Return how many acknowledged writes the final check reads back."""
        return len(self.users.keys() - self.in_doubt) + len(self.deleted) + len(self.imported)


class ServerDidNotStart(Exception):
    """The server process did not answer SERVING in time."""


@dataclasses.dataclass
class Server:
    """The `userservice serve` process of the moment, its log, and the restarts so far."""

    port: int
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    peak_rss_kib: int = 0
    log_offset: int = 0

    async def start(self) -> None:
        """Start a server process and wait until health says SERVING."""
        with self.log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "userservice", "serve",
                env=self.env, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        if not await wait_serving(self.port, SERVING_WITHIN_SECONDS):
            raise ServerDidNotStart(
                f"the server was not SERVING within {SERVING_WITHIN_SECONDS:.0f} s of its start"
            )

    async def stop(self) -> None:
        """SIGTERM the process (kill it after 30 s) and record its exit code and peak RSS."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        self.sample_rss()
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
        assert process.returncode is not None
        self.exit_codes.append(process.returncode)

    def sample_rss(self) -> None:
        """Fold the process's high-water resident set (VmHWM) into peak_rss_kib."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))

    def log_problems(self) -> list[str]:
        """Return the ERROR lines and tracebacks the server logged since the last call."""
        with self.log_path.open("rb") as log_file:
            log_file.seek(self.log_offset)
            text = log_file.read().decode(errors="replace")
            self.log_offset = log_file.tell()
        return [
            line[:300]
            for line in text.splitlines()
            if '"level":"ERROR"' in line or '"level":"CRITICAL"' in line or "Traceback" in line
        ]


async def health_status(port: int) -> int:
    """Return the server's overall health status, or UNKNOWN if it does not answer."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN
    return int(answer.status)


async def wait_serving(port: int, within: float) -> bool:
    """Poll health until SERVING; return False if it is not within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await health_status(port) == health_pb2.HealthCheckResponse.SERVING:
            return True
        await asyncio.sleep(0.1)
    return False


def _code(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, grpc.RpcError):
        return error.code(), error.details() or ""  # type: ignore[attr-defined]
    raise error


class Principal:
    """One caller with its own token, channel and ledger, making well-formed calls of every kind."""

    def __init__(self, name: str, port: int, tally: Tally, rng: random.Random) -> None:
        """Prepare calls as principal `name` to 127.0.0.1:port."""
        self.name = name
        self.target = f"127.0.0.1:{port}"
        self.tally = tally
        self.rng = rng
        self.ledger = Ledger()
        self.metadata = (("authorization", bearer(subject=name, ttl=3600)),)
        self.created = 0
        self.stub: user_service_pb2_grpc.UserServiceAsyncStub | None = None
        self.sync_stub: user_service_pb2_grpc.UserServiceStub | None = None

    def email(self) -> str:
        """Return a fresh e-mail address of this principal's."""
        self.created += 1
        return f"{self.name}-{self.created}@soak.example.com"

    async def run(self, until: float, pace: float) -> None:
        """Call until the monotonic time `until`, pausing `pace` seconds between calls."""
        operations: list[tuple[Callable[[], Any], int]] = [
            (self.create, 20), (self.get, 25), (self.batch_get, 5), (self.list_pages, 10),
            (self.update, 10), (self.delete, 5), (self.export, 3), (self.watch, 2),
            (self.import_users, 3), (self.sync, 3),
        ]  # fmt: skip
        choices = [operation for operation, _ in operations]
        weights = [weight for _, weight in operations]
        with grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS) as sync_channel:
            async with grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
                self.stub = user_service_pb2_grpc.UserServiceStub(channel)
                self.sync_stub = user_service_pb2_grpc.UserServiceStub(sync_channel)
                while time.monotonic() < until:
                    operation = self.rng.choices(choices, weights)[0]
                    await operation()
                    await asyncio.sleep(pace)

    def _known(self) -> str | None:
        certain = [user_id for user_id in self.ledger.users if user_id not in self.ledger.in_doubt]
        return self.rng.choice(certain) if certain else None

    async def _unary(self, method: str, request: Any) -> Any:
        assert self.stub is not None
        try:
            response = await getattr(self.stub, method)(
                request, metadata=self.metadata, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            code, details = _code(error)
            self.tally.record(method, code, details, WELL_FORMED)
            return error
        self.tally.record(method, S.OK, "", WELL_FORMED)
        return response

    async def create(self) -> None:
        """Create a user; retry with the same request id while the outcome is unknown."""
        email, request_id = self.email(), str(uuid.uuid4())
        request = pb.CreateUserRequest(
            user=user_pb2.User(email=email, display_name="Soak Tester"), request_id=request_id
        )
        for attempt in range(6):
            answer = await self._unary("CreateUser", request)
            if isinstance(answer, pb.CreateUserResponse):
                if answer.user.id in self.ledger.users:
                    self.tally.violations.append(
                        f"CreateUser {email}: a second create got an id twice"
                    )
                self.ledger.users[answer.user.id] = (email, "Soak Tester")
                return
            if answer.code() not in RETRY_CREATE:
                return
            await asyncio.sleep(0.2 * (attempt + 1))

    async def get(self) -> None:
        """Read a user this principal created; it must be there, as acknowledged."""
        user_id = self._known()
        if user_id is None:
            return
        answer = await self._unary("GetUser", pb.GetUserRequest(id=user_id))
        if isinstance(answer, pb.GetUserResponse):
            self._check(answer.user)
        elif answer.code() is S.NOT_FOUND:
            self.tally.violations.append(f"GetUser {user_id}: acknowledged user not found")

    async def batch_get(self) -> None:
        """Read up to five users in one call."""
        ids = [
            user_id
            for user_id in list(self.ledger.users)[-5:]
            if user_id not in self.ledger.in_doubt
        ]
        if ids:
            answer = await self._unary("BatchGetUsers", pb.BatchGetUsersRequest(ids=ids))
            if isinstance(answer, pb.BatchGetUsersResponse) and answer.not_found_ids:
                self.tally.violations.append(f"BatchGetUsers: {list(answer.not_found_ids)} missing")

    async def list_pages(self) -> None:
        """List two pages of this principal's users, the second through the page token."""
        request = pb.ListUsersRequest(page_size=10, filter=f'email:"{self.name}-"')
        answer = await self._unary("ListUsers", request)
        if isinstance(answer, pb.ListUsersResponse) and answer.next_page_token:
            request.page_token = answer.next_page_token
            await self._unary("ListUsers", request)

    async def update(self) -> None:
        """Rename a user; until an answer says otherwise its name is in doubt."""
        user_id = self._known()
        if user_id is None:
            return
        email, _ = self.ledger.users[user_id]
        name = f"Soak {self.rng.randrange(10**6)}"
        self.ledger.users[user_id] = (email, None)
        answer = await self._unary(
            "UpdateUser",
            pb.UpdateUserRequest(
                user=user_pb2.User(id=user_id, display_name=name),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
        )
        if isinstance(answer, pb.UpdateUserResponse):
            self.ledger.users[user_id] = (email, name)
            self._check(answer.user)

    async def delete(self) -> None:
        """Delete a user; without an answer it is in doubt and no longer checked."""
        user_id = self._known()
        if user_id is None:
            return
        answer = await self._unary("DeleteUser", pb.DeleteUserRequest(id=user_id))
        if isinstance(answer, pb.DeleteUserResponse):
            del self.ledger.users[user_id]
            self.ledger.deleted.add(user_id)
        elif answer.code() is S.RESOURCE_EXHAUSTED:
            return  # refused before the handler ran: nothing happened
        else:
            self.ledger.in_doubt.add(user_id)

    async def export(self) -> None:
        """Read the first 20 users of an export, then cancel it."""
        assert self.stub is not None
        stream = self.stub.StreamUsers(
            pb.StreamUsersRequest(filter=f'email:"{self.name}-"'),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT,
        )
        await self._stream("StreamUsers", stream, 20)

    async def watch(self) -> None:
        """Watch changes for half a second (the deadline ends it)."""
        assert self.stub is not None
        stream = self.stub.WatchUsers(pb.WatchUsersRequest(), metadata=self.metadata, timeout=0.5)
        await self._stream("WatchUsers", stream, 1_000)

    async def _stream(self, method: str, stream: Any, enough: int) -> None:
        received = 0
        try:
            async for _ in stream:
                received += 1
                if received >= enough:
                    stream.cancel()
                    break
        except grpc.aio.AioRpcError as error:
            code, details = _code(error)
            if not (method == "WatchUsers" and code is S.DEADLINE_EXCEEDED):
                self.tally.record(method, code, details, WELL_FORMED)
                return
        self.tally.record(method, S.OK, "", WELL_FORMED)

    async def import_users(self) -> None:
        """Import ten new users in one client stream (the sync client: see fuzz.call_streaming)."""
        emails = [self.email() for _ in range(10)]
        requests = [
            pb.ImportUsersRequest(user=user_pb2.User(email=e, display_name="Imported"))
            for e in emails
        ]
        assert self.sync_stub is not None
        stub = self.sync_stub
        try:
            answer = await asyncio.to_thread(
                stub.ImportUsers, iter(requests), metadata=self.metadata, timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as error:
            self.tally.record("ImportUsers", *_code(error), WELL_FORMED)
            return
        self.tally.record("ImportUsers", S.OK, "", WELL_FORMED)
        if answer.created_count != len(emails) or answer.rejected_count:
            self.tally.violations.append(
                f"ImportUsers: {answer.created_count} of {len(emails)} created"
            )
        self.ledger.imported.update(emails)

    async def sync(self) -> None:
        """Upsert five users by e-mail in one bidirectional stream; each answer is acknowledged."""
        known = [
            (uid, email)
            for uid, (email, _) in self.ledger.users.items()
            if uid not in self.ledger.in_doubt
        ]
        chosen = self.rng.sample(known, min(2, len(known)))
        targets = [(uid, email) for uid, email in chosen] + [("", self.email()) for _ in range(3)]
        name = f"Synced {self.rng.randrange(10**6)}"
        for uid, _ in targets:
            if uid:
                self.ledger.users[uid] = (self.ledger.users[uid][0], None)
        requests = [
            pb.SyncUsersRequest(user=user_pb2.User(email=email, display_name=name))
            for _, email in targets
        ]
        assert self.sync_stub is not None
        stub = self.sync_stub

        def call() -> list[pb.SyncUsersResponse]:
            return list(
                stub.SyncUsers(iter(requests), metadata=self.metadata, timeout=CALL_TIMEOUT)
            )

        try:
            answers = await asyncio.to_thread(call)
        except grpc.RpcError as error:
            self.tally.record("SyncUsers", *_code(error), WELL_FORMED)
            return
        self.tally.record("SyncUsers", S.OK, "", WELL_FORMED)
        for answer in answers:
            if answer.outcome == pb.SYNC_OUTCOME_FAILED:
                self.tally.violations.append(f"SyncUsers: {answer.status.message[:100]!r}")
                continue
            self.ledger.users[answer.user.id] = (answer.user.email, name)

    def _check(self, user: user_pb2.User) -> None:
        email, name = self.ledger.users.get(user.id, (user.email, None))
        if user.email != email or (name is not None and user.display_name != name):
            self.tally.violations.append(
                f"{user.id}: read {user.email}/{user.display_name}, acknowledged {email}/{name}"
            )


async def fuzz_at_low_rate(
    port: int, tally: Tally, seed: int, until: float, per_second: float
) -> None:
    """Send one fuzzed request at a time, about per_second of them, until `until`."""
    fuzzer = fuzz.Fuzzer(seed)
    methods = fuzz.all_methods()
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as sync_channel:
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            while time.monotonic() < until:
                method = fuzzer.rng.choice(methods)
                count = fuzzer.rng.choice((1, 2, 8)) if method.client_streaming else 1
                messages = [fuzzer.request_bytes(method) for _ in range(count)]
                metadata = fuzzer.metadata()
                if method.client_streaming:
                    outcome = await asyncio.to_thread(
                        fuzz.call_streaming, sync_channel, method, messages, metadata
                    )
                else:
                    outcome = await fuzz.call(channel, method, messages, metadata)
                tally.fuzzed[outcome.code.name] += 1
                if outcome.code not in FUZZED or any(
                    word in outcome.details for word in fuzz.LEAKS
                ):
                    tally.violations.append(
                        f"fuzzed {outcome.method} -> {outcome.code.name} {outcome.details[:160]!r}"
                    )
                await asyncio.sleep(1 / per_second)


async def flood(port: int, tally: Tally, until: float, *, in_flight: int = 4) -> None:
    """One principal calling as fast as it can, ignoring RetryInfo, so the limiter refuses it."""
    metadata = (("authorization", bearer(subject=f"flooder-{uuid.uuid4().hex[:8]}", ttl=3600)),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)

        async def loop() -> None:
            while time.monotonic() < until:
                try:
                    await stub.GetUser(
                        pb.GetUserRequest(id=str(uuid.uuid4())),
                        metadata=metadata,
                        timeout=CALL_TIMEOUT,
                    )
                    code, details = S.OK, ""
                except grpc.aio.AioRpcError as error:
                    code, details = _code(error)
                allowed = WELL_FORMED | {S.NOT_FOUND}  # a random id
                tally.record("GetUser (flood)", code, details, allowed, tally.flooded)
                if code in (S.UNAVAILABLE, S.CANCELLED):
                    await asyncio.sleep(0.05)  # the server is restarting: do not spin

        await asyncio.gather(*(loop() for _ in range(in_flight)))


@dataclasses.dataclass
class Faults:
    """How many of each fault the run injected."""

    postgres_cuts: int = 0
    redis_cuts: int = 0
    restarts: int = 0


async def inject_faults(
    server: Server, postgres: TcpProxy, redis: TcpProxy, faults: Faults, tally: Tally,
    started: float, until: float, cycle: float,
) -> None:  # fmt: skip
    """Each cycle: cut PostgreSQL, cut Redis, restart the server; check it serves after each."""
    while True:
        cycle_start = started + (faults.restarts * cycle)
        for offset, kind in ((0.2, "postgres"), (0.45, "redis"), (0.7, "restart")):
            at = cycle_start + offset * cycle
            if at + CUT_SECONDS >= until:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if kind == "restart":
                await server.stop()
                tally.violations += [f"server log: {line}" for line in server.log_problems()]
                await server.start()
                faults.restarts += 1
                continue
            proxy = postgres if kind == "postgres" else redis
            await proxy.stop()
            await asyncio.sleep(CUT_SECONDS)
            await proxy.start()
            if kind == "postgres":
                faults.postgres_cuts += 1
            else:
                faults.redis_cuts += 1
            if not await wait_serving(server.port, SERVING_WITHIN_SECONDS):
                tally.violations.append(
                    f"not SERVING within {SERVING_WITHIN_SECONDS:.0f} s after the {kind} cut"
                )


async def verify(port: int, principals: list[Principal], tally: Tally) -> int:
    """Read every acknowledged write back; return how many were as acknowledged."""
    metadata = (("authorization", bearer(subject="soak-verifier", ttl=3600)),)
    stored: dict[str, user_pb2.User] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        async for answer in stub.StreamUsers(
            pb.StreamUsersRequest(filter='email:"@soak.example.com"'), metadata=metadata, timeout=60
        ):
            stored[answer.user.id] = answer.user
    by_email = {user.email: user for user in stored.values()}
    verified = 0
    for principal in principals:
        ledger = principal.ledger
        for user_id, (email, name) in ledger.users.items():
            user = stored.get(user_id)
            if user_id in ledger.in_doubt:
                continue  # a delete without an answer: either state is right
            if user is None:
                tally.violations.append(
                    f"acknowledged user {user_id} ({email}) missing after the restarts"
                )
            elif user.email != email or (name is not None and user.display_name != name):
                tally.violations.append(
                    f"{user_id}: stored {user.email}/{user.display_name}, "
                    f"acknowledged {email}/{name}"
                )
            else:
                verified += 1
        for user_id in ledger.deleted:
            if user_id in stored:
                tally.violations.append(f"acknowledged delete of {user_id} undone")
            else:
                verified += 1
        for email in ledger.imported:
            if email in by_email:
                verified += 1
            else:
                tally.violations.append(f"acknowledged import of {email} missing")
    return verified


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    """Return the host and port a service URL names (the suite's PostgreSQL and Redis)."""
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


@dataclasses.dataclass
class Result:
    """What a soak run saw, and its summary line."""

    passed: bool
    summary: str
    tally: Tally
    faults: Faults
    acknowledged: int
    verified: int
    log_path: Path


async def soak(
    minutes: float, *, principals: int = 4, seed: int | None = None, log_dir: Path
) -> Result:
    """Run the soak for `minutes` and return its result (see the module docstring)."""
    seed = random.randrange(2**31) if seed is None else seed
    rng = random.Random(seed)
    tally, faults = Tally(), Faults()
    duration = minutes * 60
    cycle = min(CYCLE_SECONDS, duration)
    started = time.monotonic()
    log_path = log_dir / "server.log"
    run_id = uuid.uuid4().hex[:8]
    async with (
        fresh_postgres_database() as database_url,
        TcpProxy(*_host_port(POSTGRES_ADMIN_URL, 5432)) as postgres,
        TcpProxy(*_host_port(REDIS_URL, 6379)) as redis,
    ):
        port = free_port()
        env = suite_env(
            USERSERVICE_LISTEN_ADDRESS=f"127.0.0.1:{port}",
            USERSERVICE_DATABASE_URL=postgres.url(database_url),
            USERSERVICE_RATE_LIMIT_REDIS_URL=redis.url(REDIS_URL),
            USERSERVICE_RATE_LIMIT_RPS="100",
            USERSERVICE_RATE_LIMIT_BURST="200",
            USERSERVICE_SHUTDOWN_DRAIN_SECONDS="0.5",
            USERSERVICE_SHUTDOWN_GRACE_SECONDS="5",
            USERSERVICE_HEALTH_CHECK_INTERVAL_SECONDS="0.5",
            USERSERVICE_DB_CONNECT_TIMEOUT_SECONDS="2",
            USERSERVICE_LOG_LEVEL="INFO",
            USERSERVICE_REFLECTION="true",  # the fuzzer calls it too
        )
        server = Server(port, env, log_path)
        callers = [
            Principal(f"soak-{run_id}-{n}", port, tally, random.Random(rng.random()))
            for n in range(principals)
        ]
        await server.start()
        try:
            until = started + duration

            async def sample_rss() -> None:
                while time.monotonic() < until:
                    server.sample_rss()
                    await asyncio.sleep(0.5)

            async with asyncio.TaskGroup() as tasks:
                for caller in callers:
                    tasks.create_task(caller.run(until, pace=0.02))
                tasks.create_task(flood(port, tally, until))
                fuzz_seed = rng.randrange(2**31)
                tasks.create_task(fuzz_at_low_rate(port, tally, fuzz_seed, until, per_second=10))
                tasks.create_task(
                    inject_faults(server, postgres, redis, faults, tally, started, until, cycle)
                )
                tasks.create_task(sample_rss())
            await server.stop()
            tally.violations += [f"server log: {line}" for line in server.log_problems()]
            await server.start()
            faults.restarts += 1
            verified = await verify(port, callers, tally)
        except* ServerDidNotStart as group:
            tally.violations += [str(error) for error in group.exceptions]
            verified = 0
        finally:
            await server.stop()
            tally.violations += [f"server log: {line}" for line in server.log_problems()]
    acknowledged = sum(caller.ledger.acknowledged for caller in callers)
    bad_exits = [code for code in server.exit_codes if code != 0]
    if bad_exits:
        tally.violations.append(f"SIGTERM exit codes {server.exit_codes}")
    peak_mib = server.peak_rss_kib / 1024
    if peak_mib > MAX_RSS_MIB:
        tally.violations.append(f"peak RSS {peak_mib:.0f} MiB above {MAX_RSS_MIB} MiB")
    passed = not tally.violations and verified == acknowledged and acknowledged > 0
    codes = ", ".join(f"{name} {count}" for name, count in tally.by_code.most_common())
    fuzzed = ", ".join(f"{name} {count}" for name, count in tally.fuzzed.most_common())
    flooded = ", ".join(f"{name} {count}" for name, count in tally.flooded.most_common())
    summary = (
        f"soak: {'PASS' if passed else 'FAIL'} in {time.monotonic() - started:.0f} s "
        f"(seed {seed}): {sum(tally.by_code.values())} calls ({codes}); "
        f"{sum(tally.flooded.values())} from the flooder ({flooded}); "
        f"{sum(tally.fuzzed.values())} fuzzed ({fuzzed}); "
        f"{faults.postgres_cuts} PostgreSQL cuts, {faults.redis_cuts} Redis cuts, "
        f"{faults.restarts} SIGTERM restarts (exit codes {sorted(set(server.exit_codes))}); "
        f"{verified}/{acknowledged} acknowledged writes verified after the last restart; "
        f"peak RSS {peak_mib:.0f} MiB; {len(tally.violations)} violations"
    )
    return Result(passed, summary, tally, faults, acknowledged, verified, log_path)


def main() -> int:
    """Parse the command line, run the soak, print the violations and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=3.0, help="how long the load runs (default 3)"
    )
    parser.add_argument(
        "--principals", type=int, default=4, help="well-behaved callers (default 4)"
    )
    parser.add_argument(
        "--seed", type=int, help="seed for the calls and the fuzzer (random if unset)"
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="userservice-soak-") as directory:
        try:
            result = asyncio.run(
                soak(
                    options.minutes,
                    principals=options.principals,
                    seed=options.seed,
                    log_dir=Path(directory),
                )
            )
        except (pytest.skip.Exception, pytest.fail.Exception) as unreachable:
            # The suite's fixtures skip (or fail) when PostgreSQL is not reachable.
            print(f"soak: FAIL: {unreachable.msg}")
            return 1
        for violation in result.tally.violations[:30]:
            print(f"  {violation}")
        if not result.passed:
            kept = Path(tempfile.gettempdir()) / f"userservice-soak-{int(time.time())}.log"
            kept.write_bytes(result.log_path.read_bytes())
            print(f"soak: the server's log is kept at {kept}")
    print(result.summary)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
