"""The PostgreSQL store's writes: each runs inside one transaction and returns its last sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from userservice.domain.errors import (
    ConcurrentConflictError,
    DomainError,
    EmailAlreadyExistsError,
    StorageUnavailableError,
    SubjectAlreadyExistsError,
)
from userservice.domain.model import (
    ERASED,
    OPERATOR,
    Caller,
    EventType,
    SyncOutcome,
    User,
    UserChanges,
    email_key,
    retried_create,
)
from userservice.storage.postgres import queries
from userservice.storage.rows import (
    BACKFILL_BATCH,
    backfilled_keys,
    insert_fields,
    personal_fields,
    user_fields,
    user_from_row,
)

_EMAIL_INDEX: Final = "users_email_normalized_key"
_SUBJECT_INDEX: Final = "users_subject_key"
_UPSERT_ATTEMPTS: Final = 5

Event = tuple[EventType, User, int]


async def append_events(conn: asyncpg.Connection, events: Sequence[Event], retention: int) -> int:
    """Append events (type, user snapshot, event time) last in the transaction; return the last."""
    if not events:
        return 0
    rows = [(int(kind), event_time, *user_fields(user)) for kind, user, event_time in events]
    last = await conn.fetchval(queries.APPEND_EVENTS, retention, *_columns(rows))
    return int(last)


def _columns(rows: Sequence[Sequence[object]]) -> list[list[object]]:
    """Return rows as one list per column: the arrays an unnest statement binds."""
    return [list(column) for column in zip(*rows, strict=True)]


async def create(
    conn: asyncpg.Connection,
    user: User,
    request_id: str | None,
    fingerprint: str,
    expired_before_us: int,
    retention: int,
) -> tuple[User, int]:
    """Insert user; a live request_id answers with the user it created before."""
    if request_id is not None:
        claimed = await conn.fetchval(
            queries.CLAIM_REQUEST,
            expired_before_us,
            request_id,
            fingerprint,
            user.create_time_us,
            *user_fields(user),
        )
        if claimed is None:
            # A live key: ON CONFLICT waited for its writer to commit and locked the row,
            # so this statement's fresh snapshot sees it.
            row = await conn.fetchrow(queries.SELECT_REQUEST, request_id)
            if row is None:
                raise StorageUnavailableError("request_id expired while in use; retry")
            return retried_create(user_from_row(row), row["fingerprint"], fingerprint), 0
    await _insert_user(conn, user)
    events = [(EventType.CREATED, user, user.create_time_us)]
    return user, await append_events(conn, events, retention)


async def create_many(
    conn: asyncpg.Connection, users: Sequence[User], retention: int
) -> tuple[list[User | DomainError], int]:
    """Insert a batch with one statement; per row the user or why its email or subject is taken."""
    results: list[User | DomainError] = [EmailAlreadyExistsError() for _ in users]
    first_by_email: dict[str, tuple[int, User]] = {}
    subjects: set[str] = set()
    for index, user in enumerate(users):
        key = email_key(user.email)
        if key in first_by_email:
            continue
        if user.subject in subjects:
            results[index] = SubjectAlreadyExistsError()
            continue
        first_by_email[key] = (index, user)
        if user.subject:
            subjects.add(user.subject)
    if not first_by_email:
        return results, 0
    # Inserting in email order makes concurrent batches wait on each other's unique-index
    # entries in one direction only, so they cannot deadlock.
    batch = [first_by_email[key][1] for key in sorted(first_by_email)]
    rows = await conn.fetch(queries.INSERT_MANY, *_columns([insert_fields(u) for u in batch]))
    inserted = {str(row["id"]) for row in rows}
    # A row left out hit the email or the subject index (ON CONFLICT DO NOTHING names
    # neither): its subject held by a user with another email means the subject.
    refused = [u.subject for u in batch if u.id not in inserted and u.subject]
    owners = (
        {
            str(row["subject"]): str(row["email_normalized"])
            for row in await conn.fetch(queries.SELECT_SUBJECT_OWNERS, refused)
        }
        if refused
        else {}
    )
    events: list[Event] = []
    for index, user in sorted(first_by_email.values(), key=lambda item: item[0]):
        if user.id in inserted:
            results[index] = user
            events.append((EventType.CREATED, user, user.create_time_us))
        elif owners.get(user.subject, email_key(user.email)) != email_key(user.email):
            results[index] = SubjectAlreadyExistsError()
    return results, await append_events(conn, events, retention)


async def update(
    conn: asyncpg.Connection,
    user_id: str,
    changes: UserChanges,
    expected_etag: str | None,
    now_us: int,
    retention: int,
    caller: Caller = OPERATOR,
) -> tuple[User, int]:
    """Apply changes under a row lock after the domain's caller and etag checks."""
    current = await _lock_user(conn, user_id, expected_etag, caller, changes)
    updated = current.changed(changes, now_us)
    await _write_user(conn, updated)
    events = [(EventType.UPDATED, updated, updated.update_time_us)]
    return updated, await append_events(conn, events, retention)


async def delete(
    conn: asyncpg.Connection,
    user_id: str,
    expected_etag: str | None,
    now_us: int,
    retention: int,
    caller: Caller = OPERATOR,
) -> tuple[None, int]:
    """Delete under a row lock after the domain's caller and etag checks, erasing its data."""
    current = await _lock_user(conn, user_id, expected_etag, caller)
    events = [await _delete_locked(conn, current, now_us)]
    return None, await append_events(conn, events, retention)


async def delete_many(
    conn: asyncpg.Connection, user_ids: Sequence[str], now_us: int, retention: int
) -> tuple[list[str], int]:
    """Delete each of these users that exists as delete() does, the events appended once."""
    events: list[Event] = []
    for user_id in user_ids:
        row = await conn.fetchrow(queries.LOCK_USER, user_id)
        if row is not None:
            events.append(await _delete_locked(conn, user_from_row(row), now_us))
    deleted = [user.id for _, user, _ in events]
    return deleted, await append_events(conn, events, retention)


async def _delete_locked(conn: asyncpg.Connection, current: User, now_us: int) -> Event:
    """Delete a user whose row this transaction locked, erasing its data; return its event."""
    user_id = current.id
    await conn.execute(queries.DELETE_USER, user_id)
    erased = current.erased()
    # These row locks come before the counter's (taken last by append_events); a writer that
    # holds the counter while pruning one of these very rows can deadlock with this delete,
    # which the transaction retry in the repository reruns.
    personal = personal_fields(erased)
    await conn.execute(queries.ERASE_EVENTS, user_id, *personal)
    await conn.execute(queries.ERASE_REQUESTS, user_id, *personal, ERASED)
    return EventType.DELETED, erased, current.deletion_time(now_us)


async def upsert_by_email(
    conn: asyncpg.Connection, candidate: User, retention: int
) -> tuple[tuple[SyncOutcome, User], int]:
    """Create candidate, or apply the domain's sync decision to the user holding its email."""
    # The insert either wins the email or waits for whoever holds it; the locked read then
    # sees that user, unless it was deleted meanwhile.
    for _ in range(_UPSERT_ATTEMPTS):
        try:
            inserted = await conn.fetchval(queries.UPSERT_INSERT, *insert_fields(candidate))
        except asyncpg.UniqueViolationError as error:
            raise _unique_violation(error) from None
        if inserted is not None:
            events = [(EventType.CREATED, candidate, candidate.create_time_us)]
            return (SyncOutcome.CREATED, candidate), await append_events(conn, events, retention)
        row = await conn.fetchrow(queries.LOCK_USER_BY_EMAIL, email_key(candidate.email))
        if row is not None:
            break
    else:
        raise ConcurrentConflictError("the upsert kept racing with deletes of its email")
    outcome, updated = user_from_row(row).synced(candidate)
    if outcome is SyncOutcome.UNCHANGED:
        return (outcome, updated), 0
    await _write_user(conn, updated)
    events = [(EventType.UPDATED, updated, updated.update_time_us)]
    return (SyncOutcome.UPDATED, updated), await append_events(conn, events, retention)


async def _insert_user(conn: asyncpg.Connection, user: User) -> None:
    try:
        await conn.execute(queries.INSERT_USER, *insert_fields(user))
    except asyncpg.UniqueViolationError as error:
        raise _unique_violation(error) from None


def _unique_violation(error: Exception) -> Exception:
    """Return the domain error for the unique index a write hit, or error itself."""
    index = getattr(error, "constraint_name", None)
    if index == _EMAIL_INDEX:
        return EmailAlreadyExistsError()
    if index == _SUBJECT_INDEX:
        return SubjectAlreadyExistsError()
    return error


async def _write_user(conn: asyncpg.Connection, user: User) -> None:
    try:
        await conn.execute(queries.UPDATE_USER, *insert_fields(user))
    except asyncpg.UniqueViolationError as error:
        raise _unique_violation(error) from None


async def _lock_user(
    conn: asyncpg.Connection,
    user_id: str,
    expected_etag: str | None,
    caller: Caller,
    changes: UserChanges | None = None,
) -> User:
    # FOR UPDATE: the owner Caller.writable() sees cannot change before this transaction ends.
    row = await conn.fetchrow(queries.LOCK_USER, user_id)
    current = None if row is None else user_from_row(row)
    return caller.writable(user_id, current, expected_etag, changes)


async def backfill_keys(conn: asyncpg.Connection) -> int:
    """Compute display_name_key for rows written without it, a batch per statement.

    Runs at open; returns the number of rows keyed. Idempotent, so replicas starting at
    once may each run it.
    """
    keyed, after = 0, ""
    while True:
        rows = await conn.fetch(queries.SELECT_UNKEYED, after, BACKFILL_BATCH)
        if not rows:
            return keyed
        keys, ids, names = zip(*backfilled_keys([(row[0], row[1]) for row in rows]), strict=True)
        status = await conn.execute(queries.SET_KEYS, list(keys), list(ids), list(names))
        keyed += int(status.rsplit(" ", 1)[-1])
        after = str(rows[-1][0])
