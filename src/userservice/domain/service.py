"""The user service: business rules over a UserRepository, free of any transport concern."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from userservice.domain.errors import (
    DomainError,
    FieldViolation,
    InvalidArgumentError,
    SequenceBeyondLatestError,
    SequenceExpiredError,
    UserNotFoundError,
)
from userservice.domain.feed import DEFAULT_WINDOW_SIZE, ChangeFeed
from userservice.domain.filtering import canonical_filter, parse_filter
from userservice.domain.ids import is_valid_id, new_user_id, now_us
from userservice.domain.imports import ImportResult
from userservice.domain.model import (
    Caller,
    NewUser,
    SyncOutcome,
    User,
    UserEvent,
    UserFilter,
    WatchProgress,
)
from userservice.domain.pagination import PageTokenCodec, effective_page_size
from userservice.domain.repository import UserRepository
from userservice.domain.scans import ScanGate
from userservice.domain.updates import changes_from_mask
from userservice.domain.validation import (
    NOT_A_USER_ID,
    UserInput,
    check_request_id,
    check_user_id,
    fingerprint,
    validate_new_user,
)

MAX_BATCH_GET = 100
IMPORT_BATCH_SIZE = 500
STREAM_BATCH_SIZE = 256
DEFAULT_WATCH_PROGRESS_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class ListResult:
    """One ListUsers page."""

    users: list[User]
    next_page_token: str
    total_size: int


class UserService:
    """Validates requests, applies the rules and delegates persistence to the repository."""

    def __init__(
        self,
        repository: UserRepository,
        page_tokens: PageTokenCodec,
        *,
        clock: Callable[[], int] = now_us,
        id_factory: Callable[[], str] = new_user_id,
        watch_progress_seconds: float = DEFAULT_WATCH_PROGRESS_SECONDS,
        watch_window_size: int = DEFAULT_WINDOW_SIZE,
        scans: ScanGate | None = None,
    ) -> None:
        self._repository = repository
        self._scans = ScanGate() if scans is None else scans
        self._page_tokens = page_tokens
        self._clock = clock
        self._new_id = id_factory
        self._feed = ChangeFeed(repository, window_size=watch_window_size)
        self._watch_progress_seconds = watch_progress_seconds

    async def begin_shutdown(self) -> None:
        """End open watches (UNAVAILABLE, SHUTTING_DOWN) so a draining server is not held open."""
        await self._feed.close()

    def _build_user(self, new: NewUser) -> User:
        timestamp = self._clock()
        return new.user(self._new_id(), timestamp)

    async def create_user(self, caller: Caller, user: UserInput, request_id: str) -> User:
        """Create a user; a repeated request_id with the same input returns the first result.

        A non-admin caller creates its own user (see Caller.new_user).
        """
        new = caller.new_user(validate_new_user(user))
        key = check_request_id(request_id)
        return await self._repository.create(self._build_user(new), key, fingerprint(new))

    async def get_user(self, user_id: str) -> User:
        """Return a user by id."""
        found = await self._repository.get(check_user_id(user_id, "id"))
        if found is None:
            raise UserNotFoundError(user_id)
        return found

    async def batch_get_users(self, user_ids: Sequence[str]) -> tuple[list[User], list[str]]:
        """Return the users found (request order, duplicates once) and the ids not found."""
        if not user_ids:
            raise InvalidArgumentError.single("ids", "at least one id is required")
        if len(user_ids) > MAX_BATCH_GET:
            raise InvalidArgumentError.single("ids", f"at most {MAX_BATCH_GET} ids per call")
        unique = list(dict.fromkeys(user_ids))
        violations = [
            FieldViolation(f"ids[{index}]", NOT_A_USER_ID)
            for index, user_id in enumerate(user_ids)
            if not is_valid_id(user_id)
        ]
        if violations:
            raise InvalidArgumentError(violations)
        found = await self._repository.get_many(unique)
        users = [found[user_id] for user_id in unique if user_id in found]
        missing = [user_id for user_id in unique if user_id not in found]
        return users, missing

    async def list_users(
        self, page_size: int, page_token: str, filter_text: str, *, principal: str | None = None
    ) -> ListResult:
        """Return one page in id order, its total and the next page's token.

        The total is counted once, with the first page and in its snapshot, then carried
        in the signed token (AIP-132 allows it), so paging through N rows costs O(N)
        instead of one full count per page. A scan filter counts against principal's (and
        the replica's) scans in progress for the duration of the call.
        """
        limit = effective_page_size(page_size)
        user_filter = parse_filter(filter_text)
        filter_key = canonical_filter(user_filter)
        position = self._page_tokens.decode(page_token, filter_key) if page_token else None
        carried = None if position is None else position.total_size
        after_id = None if position is None else position.after_id
        with self._scan(user_filter.is_scan, principal):
            page = await self._repository.list_page(
                user_filter, after_id, limit, with_total=carried is None
            )
        total = page.total_size if carried is None else carried
        next_token = (
            self._page_tokens.encode(page.users[-1].id, filter_key, total)
            if page.has_more and page.users
            else ""
        )
        return ListResult(page.users, next_token, total)

    async def stream_user_batches(
        self, filter_text: str, *, principal: str | None = None
    ) -> AsyncGenerator[list[User], None]:
        """Yield every matching user in id order, one bounded batch in memory at a time.

        Batches rather than users: the caller loops over each without resuming this
        generator per user. A scan filter counts as one of principal's scans in progress
        from the first batch until the generator ends or is closed.
        """
        user_filter = parse_filter(filter_text)
        after_id: str | None = None
        with self._scan(user_filter.is_scan, principal):
            while True:
                page = await self._repository.list_page(
                    user_filter, after_id, STREAM_BATCH_SIZE, with_total=False
                )
                if page.users:
                    yield page.users
                if not page.has_more or not page.users:
                    return
                after_id = page.users[-1].id

    def _scan(
        self, is_scan: bool, principal: str | None
    ) -> contextlib.AbstractContextManager[None]:
        return self._scans.admit(principal) if is_scan else contextlib.nullcontext()

    async def update_user(
        self, caller: Caller, user_id: str, user: UserInput, mask_paths: Sequence[str], etag: str
    ) -> User:
        """Apply the fields named by the mask (AIP-134); a stale etag fails the update.

        The store asks caller.writable() inside its transaction whether this caller may.
        """
        check_user_id(user_id, "user.id")
        changes = changes_from_mask(user, mask_paths)
        return await self._repository.update(
            user_id, changes, etag or None, self._clock(), caller=caller
        )

    async def delete_user(self, caller: Caller, user_id: str, etag: str) -> None:
        """Delete a user and erase its personal data; caller.writable() decides who may."""
        user_id = check_user_id(user_id, "id")
        await self._repository.delete(user_id, etag or None, self._clock(), caller=caller)
        # The store erased its rows in the delete's transaction; this erases what this process
        # read before, so no watcher is sent the data once DeleteUser has returned.
        self._feed.erase([user_id])

    async def purge_batch(self, user_filter: UserFilter, limit: int) -> tuple[int, int]:
        """Delete up to limit users matching the filter in one transaction; (found, deleted).

        The deletions are DeleteUser's (erasure and DELETED events, in the store's
        transaction); found is 0 once no user matches.
        """
        page = await self._repository.list_page(user_filter, None, limit, with_total=False)
        if not page.users:
            return 0, 0
        deleted = await self._repository.delete_users(
            [user.id for user in page.users], self._clock()
        )
        self._feed.erase(deleted)
        return len(page.users), len(deleted)

    async def count_users(self, user_filter: UserFilter) -> int:
        """Return how many users match the filter now."""
        page = await self._repository.list_page(user_filter, None, 1, with_total=True)
        return page.total_size

    async def import_users(self, users: AsyncIterable[UserInput]) -> ImportResult:
        """Create users from a stream; valid rows commit in batches, bad rows are reported.

        A full batch commits while the next one is read and validated, at most one commit in
        flight, so batches still commit in stream order and the store's thread works while
        the event loop does, instead of in turn.
        """
        result = ImportResult()
        batch: list[tuple[int, User]] = []
        committing: asyncio.Task[None] | None = None
        index = -1
        try:
            async for user in users:
                index += 1
                try:
                    batch.append((index, self._build_user(validate_new_user(user))))
                except InvalidArgumentError as error:
                    result.reject(index, error)
                if len(batch) >= IMPORT_BATCH_SIZE:
                    if committing is not None:
                        await committing
                    committing = asyncio.ensure_future(self._flush_import(batch, result))
                    batch = []
            if committing is not None:
                await committing
            if batch:
                await self._flush_import(batch, result)
        finally:
            if committing is not None and not committing.done():
                # The call is ending early (cancelled, or the stream failed): the batch already
                # handed to the store commits as it would have had the call been waiting on it,
                # and its outcome has no one left to go to.
                committing.add_done_callback(_outcome_dropped)
        return result

    async def _flush_import(self, batch: list[tuple[int, User]], result: ImportResult) -> None:
        outcomes = await self._repository.create_many([user for _, user in batch])
        for (index, _), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, DomainError):
                result.reject(index, outcome)
            else:
                result.created_count += 1

    async def sync_user(self, user: UserInput) -> tuple[SyncOutcome, User]:
        """Upsert by email: create, update display_name and role, or report unchanged."""
        return await self._repository.upsert_by_email(self._build_user(validate_new_user(user)))

    async def watch_users(
        self, after_sequence: int | None
    ) -> AsyncIterator[UserEvent | WatchProgress]:
        """Yield events after a sequence (or from now), then follow new ones until shutdown.

        A stream with nothing to send for watch_progress_seconds gets a WatchProgress
        carrying the last sequence it has seen, which is the latest committed one.
        """
        oldest, latest = await self._repository.event_bounds()
        if after_sequence is None:
            cursor = latest
        elif after_sequence < 0:
            raise InvalidArgumentError.single("after_sequence", "must not be negative")
        elif after_sequence == 0:
            cursor = oldest
        elif after_sequence > latest:
            raise SequenceBeyondLatestError(after_sequence, latest)
        elif after_sequence < oldest:
            raise SequenceExpiredError(after_sequence, oldest)
        else:
            cursor = after_sequence
        watcher = self._feed.watch(cursor, from_oldest=after_sequence == 0)
        try:
            while True:
                event = await watcher.next(self._watch_progress_seconds)
                yield WatchProgress(watcher.sent) if event is None else event
        finally:
            watcher.close()


def _outcome_dropped(task: asyncio.Task[None]) -> None:
    # Retrieved so that asyncio does not log a failure nobody could have handled.
    if not task.cancelled():
        task.exception()
