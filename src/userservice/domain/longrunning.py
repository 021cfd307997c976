"""Running long-running operations: PurgeUsers, leases, resumption, cancel and wait.

A replica runs each operation it starts in a task of its own and holds the operation's
lease, renewing it with every batch. A sweeper claims operations whose lease expired (their
replica died, or stopped and released them) and resumes them here: PurgeUsers is naturally
resumable, as it re-runs its filter. Cancel only sets a flag in the store; the runner, on
whichever replica, reads it with each renewal and ends the operation CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from userservice.domain.errors import (
    DomainError,
    InvalidArgumentError,
    OperationCancelledError,
    OperationFailedError,
    OperationNotDoneError,
    OperationNotFoundError,
)
from userservice.domain.filtering import parse_filter
from userservice.domain.ids import new_user_id, now_us
from userservice.domain.model import Caller, UserFilter
from userservice.domain.operations import (
    OPERATIONS_COLLECTION,
    Operation,
    OperationRepository,
    check_operation_name,
    dump,
    error_document,
    new_operation_name,
    parse_done_filter,
)
from userservice.domain.pagination import PageTokenCodec, effective_page_size
from userservice.domain.service import UserService

PURGE_USERS: Final = "PurgeUsers"
"""The kind of a PurgeUsers operation."""
CLAIM_LIMIT: Final = 10
"""Operations one sweep takes over at most; the next sweep takes more."""
STOP_SECONDS: Final = 5.0
"""How long close() lets a runner finish its batch before cancelling it."""
MAX_WAIT_SECONDS: Final = 60.0
"""How long WaitOperation waits at most, whatever timeout it asks for (AIP-151 lets a server
answer earlier); the call's deadline may bound it further."""
_FIRST_POLL_SECONDS: Final = 0.05
_MAX_POLL_SECONDS: Final = 1.0

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OperationOptions:
    """How this replica runs operations."""

    lease_seconds: float = 30.0
    """How long a runner's lease lasts without renewal; a dead runner's work waits this long."""
    purge_batch_size: int = 100
    """Users deleted per transaction by PurgeUsers."""
    purge_batch_interval_seconds: float = 0.0
    """Pause between PurgeUsers batches, so a purge leaves the store to the other calls."""


@dataclass(frozen=True, slots=True)
class PurgeProgress:
    """PurgeUsers' metadata: matched counts the users found when it (re)started."""

    matched_count: int
    purged_count: int
    start_time_us: int
    update_time_us: int

    def document(self) -> str:
        """Return the stored JSON form."""
        return dump(
            {
                "matched_count": self.matched_count,
                "purged_count": self.purged_count,
                "start_time_us": self.start_time_us,
                "update_time_us": self.update_time_us,
            }
        )

    @classmethod
    def parse(cls, document: str) -> PurgeProgress:
        """Read the stored JSON form."""
        fields = json.loads(document)
        return cls(
            int(fields["matched_count"]),
            int(fields["purged_count"]),
            int(fields["start_time_us"]),
            int(fields["update_time_us"]),
        )


def purged_count(operation: Operation) -> int | None:
    """Return the result of a successful PurgeUsers operation, None if it has none."""
    if operation.result is None:
        return None
    return int(json.loads(operation.result)["purged_count"])


@dataclass(frozen=True, slots=True)
class OperationPage:
    """One ListOperations page."""

    operations: list[Operation]
    next_page_token: str


def replica_name() -> str:
    """Return this process's name as a lease owner: unique, and readable in the store."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_user_id()[-12:]}"


class OperationService:
    """Starts, runs, resumes and answers for the long-running operations."""

    def __init__(
        self,
        repository: OperationRepository,
        users: UserService,
        page_tokens: PageTokenCodec,
        options: OperationOptions | None = None,
        *,
        replica: str | None = None,
        clock: Callable[[], int] = now_us,
    ) -> None:
        """Run operations over repository, deleting users through users' rules."""
        self._repository = repository
        self._users = users
        self._page_tokens = page_tokens
        self._options = options or OperationOptions()
        self._replica = replica or replica_name()
        self._clock = clock
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._latest: dict[str, str] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        # Set and replaced whenever a local runner writes: local waiters look again at once.
        self._changed = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def replica(self) -> str:
        """This replica's name as a lease owner."""
        return self._replica

    def start(self) -> None:
        """Start sweeping for operations whose lease expired (first sweep at once)."""
        self._sweeper = asyncio.create_task(self._sweep(), name="operations-sweeper")

    async def close(self) -> None:
        """Stop the runners and release their leases, so another replica resumes them at once.

        A runner stops between batches, its progress exact; one still in a batch after
        STOP_SECONDS is cancelled (its last batch may then be missing from the counts).
        """
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for wakeup in self._wakeups.values():
            wakeup.set()
        runners = list(self._runners.values())
        if runners:
            _, late = await asyncio.wait(runners, timeout=STOP_SECONDS)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for name, metadata in list(self._latest.items()):
            try:
                await self._repository.renew_operation(
                    name, self._replica, metadata, 0, self._clock()
                )
            except DomainError as error:
                # The lease then expires by itself: resumption waits lease_seconds longer.
                _log.warning("could not release operation %s: %s", name, error)
        self._latest.clear()

    # -- the API ---------------------------------------------------------------

    async def purge_users(self, caller: Caller, filter_text: str) -> Operation:
        """Start deleting every user the filter matches; return the new operation."""
        if not filter_text.strip():
            raise InvalidArgumentError.single(
                "filter", "is required: a purge of every user must say so (e.g. role != 99)"
            )
        parse_filter(filter_text)
        now = self._clock()
        progress = PurgeProgress(0, 0, now, now)
        operation = Operation(
            name=new_operation_name(),
            kind=PURGE_USERS,
            owner=caller.subject,
            request=dump({"filter": filter_text}),
            metadata=progress.document(),
            done=False,
            result=None,
            error=None,
            cancel_requested=False,
            lease_owner=self._replica,
            lease_expiry_us=self._lease_expiry(now),
            create_time_us=now,
            update_time_us=now,
        )
        await self._repository.create_operation(operation)
        self._launch(operation)
        return operation

    async def get(self, caller: Caller, name: str) -> Operation:
        """Return the operation if caller may see it; else NOT_FOUND, as if it did not exist."""
        operation = await self._repository.get_operation(check_operation_name(name))
        if operation is None or not operation.visible_to(caller):
            raise OperationNotFoundError(name)
        return operation

    async def list(
        self, caller: Caller, collection: str, filter_text: str, page_size: int, page_token: str
    ) -> OperationPage:
        """Return one page of the operations caller may see, in creation order."""
        if collection not in ("", OPERATIONS_COLLECTION):
            raise InvalidArgumentError.single("name", f'must be empty or "{OPERATIONS_COLLECTION}"')
        limit = effective_page_size(page_size)
        done = parse_done_filter(filter_text)
        owner = None if caller.admin else caller.subject
        # The token is bound to what the listing selects, caller included.
        key = f"operations done={done} owner={owner}"
        after = self._page_tokens.decode(page_token, key).after_id if page_token else None
        found = await self._repository.list_operations(owner, done, after, limit + 1)
        page = found[:limit]
        more = len(found) > limit
        token = self._page_tokens.encode(page[-1].name, key, 0) if more and page else ""
        return OperationPage(page, token)

    async def cancel(self, caller: Caller, name: str) -> None:
        """Ask the operation to stop; it ends CANCELLED after its current batch (done: no-op)."""
        operation = await self.get(caller, name)
        if operation.done:
            return
        await self._repository.cancel_operation(operation.name, self._clock())
        wakeup = self._wakeups.get(operation.name)
        if wakeup is not None:
            wakeup.set()

    async def delete(self, caller: Caller, name: str) -> None:
        """Forget a finished operation; a running one is FAILED_PRECONDITION (cancel it first)."""
        operation = await self.get(caller, name)
        if not operation.done or not await self._repository.delete_operation(operation.name):
            raise OperationNotDoneError(operation.name)

    async def wait(self, caller: Caller, name: str, timeout: float | None) -> Operation:
        """Return the operation once done, or as it is when timeout seconds have passed.

        The store is polled with a growing interval; a runner on this replica wakes the
        waiters at once.
        """
        if timeout is not None and timeout < 0:
            raise InvalidArgumentError.single("timeout", "must not be negative")
        loop = asyncio.get_running_loop()
        budget = MAX_WAIT_SECONDS if timeout is None else min(timeout, MAX_WAIT_SECONDS)
        give_up = loop.time() + budget
        interval = _FIRST_POLL_SECONDS
        while True:
            changed = self._changed
            operation = await self.get(caller, name)
            left = give_up - loop.time()
            if operation.done or left <= 0:
                return operation
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(interval, left))
            interval = min(interval * 2, _MAX_POLL_SECONDS)

    # -- running ---------------------------------------------------------------

    def _lease_expiry(self, now: int) -> int:
        return now + int(self._options.lease_seconds * 1_000_000)

    def _launch(self, operation: Operation) -> None:
        if self._closed or operation.name in self._runners:
            return
        self._latest[operation.name] = operation.metadata
        self._wakeups[operation.name] = asyncio.Event()
        task = asyncio.create_task(self._run(operation), name=f"operation {operation.name}")
        self._runners[operation.name] = task
        task.add_done_callback(lambda _: self._forget(operation.name))

    def _forget(self, name: str) -> None:
        self._runners.pop(name, None)
        self._wakeups.pop(name, None)
        if not self._closed:
            self._latest.pop(name, None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _sweep(self) -> None:
        while True:
            try:
                now = self._clock()
                claimed = await self._repository.claim_operations(
                    self._replica, now, self._lease_expiry(now), CLAIM_LIMIT
                )
            except DomainError as error:
                _log.warning("could not look for operations to resume: %s", error)
                claimed = []
            for operation in claimed:
                _log.info("resuming operation %s", operation.name)
                self._launch(operation)
            await asyncio.sleep(self._options.lease_seconds / 2)

    async def _run(self, operation: Operation) -> None:
        name = operation.name
        try:
            if operation.kind != PURGE_USERS:
                await self._finish(name, operation.metadata, error=OperationFailedError())
                return
            await self._purge(operation)
        except DomainError as error:
            # The store failed: the lease runs out and a sweep (here or elsewhere) resumes.
            _log.warning("operation %s paused: %s", name, error)
        except Exception:
            _log.exception("operation %s failed", name)
            with contextlib.suppress(DomainError):
                await self._finish(name, self._latest[name], error=OperationFailedError())
        finally:
            self._notify()

    async def _purge(self, operation: Operation) -> None:
        name = operation.name
        user_filter: UserFilter = parse_filter(json.loads(operation.request)["filter"])
        progress = PurgeProgress.parse(operation.metadata)
        # Counted at every (re)start: a resumed purge matches what is left plus what is gone.
        remaining = await self._users.count_users(user_filter)
        progress = replace(
            progress,
            matched_count=progress.purged_count + remaining,
            update_time_us=self._clock(),
        )
        current = await self._renew(name, progress)
        batch = self._options.purge_batch_size
        while True:
            if self._closed:
                return  # close() releases the lease with the progress recorded here
            if current is None:
                _log.info("operation %s is another replica's now", name)
                return
            if current.cancel_requested:
                await self._finish(name, progress.document(), error=OperationCancelledError())
                return
            found, deleted = await self._users.purge_batch(user_filter, batch)
            if not found:
                result = dump({"purged_count": progress.purged_count})
                await self._finish(name, progress.document(), result=result)
                return
            progress = replace(
                progress,
                purged_count=progress.purged_count + deleted,
                update_time_us=self._clock(),
            )
            current = await self._renew(name, progress)
            self._notify()
            pause = self._options.purge_batch_interval_seconds
            if pause and current is not None and not current.cancel_requested:
                # A local cancel or close() ends the pause; the renewal after it reads the
                # cancel that may have come meanwhile, so no batch runs after it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeups[name].wait(), pause)
                if not self._closed:
                    current = await self._renew(name, progress)

    async def _renew(self, name: str, progress: PurgeProgress) -> Operation | None:
        document = progress.document()
        self._latest[name] = document
        now = self._clock()
        return await self._repository.renew_operation(
            name, self._replica, document, self._lease_expiry(now), now
        )

    async def _finish(
        self,
        name: str,
        metadata: str,
        *,
        result: str | None = None,
        error: DomainError | None = None,
    ) -> None:
        stored_error = None if error is None else error_document(error)
        await self._repository.finish_operation(
            name, self._replica, metadata, result, stored_error, self._clock()
        )
        self._latest.pop(name, None)
