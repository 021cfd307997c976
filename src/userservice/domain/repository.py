"""The storage protocol the domain owns; SQLite and PostgreSQL implement it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from userservice.domain.errors import DomainError
from userservice.domain.model import (
    OPERATOR,
    Caller,
    Page,
    SyncOutcome,
    User,
    UserChanges,
    UserEvent,
    UserFilter,
)
from userservice.domain.operations import OperationRepository


class UserRepository(OperationRepository, Protocol):
    """Durable user store with a change log, and the long-running operations (see there).

    Contract every implementation keeps:
    - Each write is one transaction that also appends its UserEvent; a failed
      write changes nothing.
    - Emails are unique without regard to case (compared lower-cased), under
      concurrency: the database enforces it, not a read-then-write check. So
      are non-empty subjects (SubjectAlreadyExistsError); many users may have none.
    - Who may change or delete a user is decided by Caller.writable(), called on
      the stored row inside the write's transaction (with the row locked), never
      on a copy read before it.
    - Event sequences are contiguous (a rolled-back write leaves no hole),
      strictly increasing, and become visible in sequence order, so a reader
      that has seen N never later finds an event below N; a hole can only
      mean retention pruned events, which WatchUsers reports.
    - Connectivity failures raise StorageUnavailableError; nothing else from
      the driver escapes except as a bug.
    """

    async def create(self, user: User, request_id: str | None, fingerprint: str) -> User:
        """Insert a user built by the domain.

        With a request_id: if that id was used before with the same fingerprint,
        return the user stored then (and insert nothing); with another
        fingerprint raise RequestIdReusedError. Raises EmailAlreadyExistsError
        or SubjectAlreadyExistsError.
        """
        ...

    async def create_many(self, users: Sequence[User]) -> list[User | DomainError]:
        """Insert a batch in one transaction; per row the stored user or the row's error.

        A row whose email is taken (in the store or earlier in the batch) gets
        EmailAlreadyExistsError, one whose subject is taken SubjectAlreadyExistsError,
        and neither stops the others.
        """
        ...

    async def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None."""
        ...

    async def get_many(self, user_ids: Sequence[str]) -> dict[str, User]:
        """Return the users among these ids that exist, keyed by id."""
        ...

    async def get_by_email(self, email: str) -> User | None:
        """Return the user whose email equals this one without regard to case."""
        ...

    async def list_page(
        self, user_filter: UserFilter, after_id: str | None, limit: int, with_total: bool
    ) -> Page:
        """Return up to limit users matching the filter with id > after_id, in id order.

        total_size is the exact count of matches when with_total, else 0.
        """
        ...

    async def update(
        self,
        user_id: str,
        changes: UserChanges,
        expected_etag: str | None,
        now_us: int,
        *,
        caller: Caller = OPERATOR,
    ) -> User:
        """Apply changes atomically; update_time becomes max(now_us, previous + 1).

        Raises what caller.writable() raises (UserNotFoundError, NotOwnerError,
        AdminOnlyFieldError, EtagMismatchError), EmailAlreadyExistsError or
        SubjectAlreadyExistsError.
        """
        ...

    async def delete(
        self, user_id: str, expected_etag: str | None, now_us: int, *, caller: Caller = OPERATOR
    ) -> None:
        """Delete a user. Raises what caller.writable() raises."""
        ...

    async def delete_users(self, user_ids: Sequence[str], now_us: int) -> list[str]:
        """Delete these users in one transaction as the operator; return the ids deleted.

        Each deletion is delete()'s (erasure, a DELETED event); ids that name no user (any
        more) are skipped.
        """
        ...

    async def upsert_by_email(self, candidate: User) -> tuple[SyncOutcome, User]:
        """Create candidate, or set display_name, role and any subject on the user with its email.

        Atomic: concurrent upserts of one email never create two users. An
        update keeps the stored id, email spelling and create_time, and uses
        candidate.update_time_us as its clock (at least previous + 1).
        """
        ...

    async def events_after(self, sequence: int, limit: int) -> list[UserEvent]:
        """Return up to limit events with sequence > the given one, ascending."""
        ...

    async def event_bounds(self) -> tuple[int, int]:
        """Return (oldest retained sequence - 1, latest sequence); (0, 0) when empty."""
        ...

    async def wait_for_events(self, after_sequence: int, timeout: float) -> None:
        """Return once an event after after_sequence may exist, or after timeout seconds."""
        ...

    async def ping(self) -> None:
        """Raise StorageUnavailableError unless the store answers a trivial query."""
        ...

    async def close(self) -> None:
        """Release connections and threads; later calls fail."""
        ...
