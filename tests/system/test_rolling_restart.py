"""Zero-downtime rolling restart: two replicas on one database behind one UserServiceClient.

Steady mixed load (create, get, update and delete under etags, list) and a watcher run while
each replica in turn is sent SIGTERM and started again. The client's health checking moves
traffic off a draining replica (USERSERVICE_SHUTDOWN_DRAIN_SECONDS) before server.stop, its
retries cover the rest: every call succeeds, every acknowledged write is stored, and the
watcher sees every acknowledged change once, in order, across both restarts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers.ports import free_port
from helpers.processes import (
    Replica,
    assert_stopped_cleanly,
    replica_env,
    stop_process,
    wait_serving,
)
from helpers.tokens import bearer

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.client import NotFoundError, UserServiceClient

pytestmark = pytest.mark.postgres

WORKERS = 4
DRAIN_SECONDS = "1.5"
# How long the client's health Watch may take to see NOT_SERVING and leave a replica.
HEALTH_PROPAGATION_SECONDS = 0.5
SETTLE_SECONDS = 2.0  # after a restart, before the next replica goes: the client reconnects


async def _start(database_url: str, port: int, log_path: Path) -> Replica:
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "userservice", "serve",
            env=replica_env(
                database_url, port,
                USERSERVICE_SHUTDOWN_DRAIN_SECONDS=DRAIN_SECONDS,
                USERSERVICE_SHUTDOWN_GRACE_SECONDS="5",
                USERSERVICE_LOG_LEVEL="INFO",  # the access log shows who got calls when
            ),
            stdout=log_file, stderr=log_file,
        )  # fmt: skip
    replica = Replica(process, port, log_path)
    await wait_serving(replica)
    return replica


def _seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def calls_started_while_draining(log: str) -> tuple[int, int]:
    """Return (calls begun in the drain's first moments, calls begun after the client left).

    From the replica's JSON log: the window opens at "shutting down"; a UserService call that
    began more than HEALTH_PROPAGATION_SECONDS later (its end minus its duration) reached a
    replica the client should already have taken out of rotation.
    """
    draining_since: float | None = None
    early = late = 0
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("message") == "shutting down":
            draining_since = _seconds(entry["time"])
        elif entry.get("message") == "stopped":
            draining_since = None
        elif draining_since is not None and entry.get("logger") == "userservice.access":
            method = entry["method"]
            if not method.startswith("/user.v1.UserService/") or method.endswith("/WatchUsers"):
                continue
            began = _seconds(entry["time"]) - entry["duration_ms"] / 1000
            if began > draining_since + HEALTH_PROPAGATION_SECONDS:
                late += 1
            elif began > draining_since:
                early += 1
    return early, late


class Load:
    """Workers issuing mixed calls until stopped; what was acknowledged, and what failed."""

    def __init__(self, client: UserServiceClient) -> None:
        self.client = client
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.live: dict[str, user_pb2.User] = {}  # acknowledged and not deleted
        self.deleted: set[str] = set()
        self.expected_events: list[tuple[str, int]] = []  # (user id, event type)
        self.stopping = asyncio.Event()

    async def worker(self, index: int) -> None:
        """Loop: create, read back, rename under the etag, list, every 4th deleted."""
        step = 0
        while not self.stopping.is_set():
            step += 1
            try:
                user = await self.client.create_user(
                    f"w{index}-{step}-{uuid.uuid4().hex[:6]}@example.com", f"Worker {index}"
                )
                self._ack("create", user.id, user_pb2.USER_EVENT_TYPE_CREATED, user)
                assert (await self.client.get_user(user.id)).etag == user.etag
                self.calls["get"] += 1
                user = await self.client.update_user(
                    user_pb2.User(id=user.id, display_name=f"Step {step}", etag=user.etag),
                    ["display_name"],
                )
                self._ack("update", user.id, user_pb2.USER_EVENT_TYPE_UPDATED, user)
                await self.client.list_users(page_size=5)
                self.calls["list"] += 1
                if step % 4 == 0:
                    await self.client.delete_user(user.id, etag=user.etag)
                    self.live.pop(user.id)
                    self.deleted.add(user.id)
                    self._ack("delete", user.id, user_pb2.USER_EVENT_TYPE_DELETED, None)
            except Exception as error:  # every failure is a finding, reported below
                self.failures.append(f"{type(error).__name__}: {error}")
            await asyncio.sleep(0.01)

    def _ack(self, call: str, user_id: str, event: int, user: user_pb2.User | None) -> None:
        self.calls[call] += 1
        self.expected_events.append((user_id, event))
        if user is not None:
            self.live[user_id] = user


async def _watch(client: UserServiceClient, seen: list[pb.WatchUsersResponse]) -> None:
    async for event in client.watch_users(after_sequence=0):
        seen.append(event)


@pytest.mark.asyncio
async def test_rolling_restart_loses_no_call_write_or_event(
    postgres_url: str, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    replicas = [
        await _start(postgres_url, port, tmp_path / f"replica{i}.log")
        for i, port in enumerate(ports)
    ]
    stopped: list[Replica] = []
    client = UserServiceClient(
        f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}",
        token=bearer().removeprefix("Bearer "),
        timeout=10,
    )
    load = Load(client)
    seen: list[pb.WatchUsersResponse] = []
    watcher = asyncio.create_task(_watch(client, seen))
    workers = [asyncio.create_task(load.worker(i)) for i in range(WORKERS)]
    started = time.monotonic()
    try:
        async with asyncio.timeout(120):
            await asyncio.sleep(SETTLE_SECONDS)
            for index in range(2):
                await stop_process(replicas[index].process)
                stopped.append(replicas[index])
                replicas[index] = await _start(
                    postgres_url, ports[index], tmp_path / f"replica{index}.log"
                )
                await asyncio.sleep(SETTLE_SECONDS)
            load.stopping.set()
            await asyncio.gather(*workers)
            # The watcher catches up with everything acknowledged.
            while len(seen) < len(load.expected_events):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            for user_id, user in load.live.items():
                assert (await client.get_user(user_id)).etag == user.etag
            for user_id in load.deleted:
                with pytest.raises(NotFoundError):
                    await client.get_user(user_id)
    finally:
        load.stopping.set()
        for task in [*workers, watcher]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.close()
        for replica in replicas:
            await stop_process(replica.process)
    elapsed = time.monotonic() - started
    drains = [calls_started_while_draining(replica.log()) for replica in replicas]
    print(
        f"\nrolling restart: {sum(load.calls.values())} calls acknowledged "
        f"({dict(load.calls)}), {len(load.failures)} failed, {len(seen)} events watched, "
        f"{len(load.live)} users live, {len(load.deleted)} deleted, in {elapsed:.1f} s; "
        f"calls begun on a draining replica (first {HEALTH_PROPAGATION_SECONDS} s, later): {drains}"
    )
    assert load.failures == []
    # Client-side health checking moved the traffic before server.stop, not the retries.
    assert [late for _, late in drains] == [0, 0]
    assert load.calls["create"] > 20
    for replica in stopped:
        assert_stopped_cleanly(replica)
    # No gap: sequences are taken inside the writing transaction, so they are contiguous.
    assert [event.sequence for event in seen] == list(range(1, len(seen) + 1))
    assert sorted((event.user.id, event.type) for event in seen) == sorted(load.expected_events)
