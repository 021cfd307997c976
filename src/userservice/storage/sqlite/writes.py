"""The SQLite store's writes, each inside one BEGIN IMMEDIATE transaction (writer thread)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from userservice.domain.errors import (
    DomainError,
    EmailAlreadyExistsError,
    SubjectAlreadyExistsError,
)
from userservice.domain.ids import now_us
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
from userservice.storage.rows import (
    BACKFILL_BATCH,
    backfilled_keys,
    insert_fields,
    personal_fields,
    user_fields,
    user_from_row,
)
from userservice.storage.sqlite import queries
from userservice.storage.sqlite.connection import transaction
from userservice.storage.sqlite.reads import fetch_user


class WriteTransaction:
    """One write transaction's connection and effects: cache changes and appended events."""

    __slots__ = ("cache", "conn", "events", "last_sequence")

    def __init__(self, conn: sqlite3.Connection) -> None:
        """Collect the effects of a transaction on conn (already begun by the caller)."""
        self.conn = conn
        self.cache: dict[str, User | None] = {}
        self.events = 0
        self.last_sequence = 0

    def insert(self, user: User) -> bool:
        """Insert a user unless its email is taken; tell whether it was inserted."""
        try:
            return self.conn.execute(queries.INSERT_USER, insert_fields(user)).rowcount == 1
        except sqlite3.IntegrityError as error:
            raise _unique_violation(error) from None

    def overwrite(self, user: User) -> None:
        """Overwrite the stored row of user.id with user."""
        try:
            self.conn.execute(queries.UPDATE_USER, insert_fields(user))
        except sqlite3.IntegrityError as error:
            raise _unique_violation(error) from None

    def insert_new(self, users: Sequence[User]) -> None:
        """Insert users whose emails are known to be free, each with its CREATED event."""
        if not users:
            return
        inserted = self.conn.executemany(
            queries.INSERT_USER, [insert_fields(user) for user in users]
        ).rowcount
        if inserted != len(users):
            # Cannot happen inside BEGIN IMMEDIATE; if it did, the rollback keeps the batch out.
            raise sqlite3.IntegrityError("an email was taken between the check and the insert")
        created = int(EventType.CREATED)
        self.conn.executemany(
            queries.INSERT_EVENTS,
            [(created, user.create_time_us, *user_fields(user)) for user in users],
        )
        self.last_sequence = self.conn.execute(queries.LAST_SEQUENCE).fetchone()[0]
        self.events += len(users)

    def event(self, event_type: EventType, user: User, event_time_us: int) -> None:
        """Append a change event in this transaction."""
        values = (int(event_type), event_time_us, *user_fields(user))
        self.last_sequence = self.conn.execute(queries.INSERT_EVENT, values).fetchone()[0]
        self.events += 1


def create(
    writes: WriteTransaction,
    user: User,
    request_id: str | None,
    fingerprint: str,
    retention_us: int,
) -> User:
    """Insert user; a live request_id answers with the user it created before."""
    now = now_us()
    if request_id is not None:
        request = (request_id, now - retention_us)
        row = writes.conn.execute(queries.SELECT_REQUEST, request).fetchone()
        if row is not None:
            return retried_create(user_from_row(row), row[-1], fingerprint)
    if not writes.insert(user):
        raise EmailAlreadyExistsError()
    if request_id is not None:
        record = (*user_fields(user), request_id, fingerprint, now)
        writes.conn.execute(queries.INSERT_REQUEST, record)
    writes.event(EventType.CREATED, user, user.create_time_us)
    writes.cache[user.id] = user
    return user


def create_many(writes: WriteTransaction, users: Sequence[User]) -> list[User | DomainError]:
    """Insert each user whose email and subject are free; the others get the error saying which."""
    # New ids cannot be cached yet, and caching a bulk import would only push out hot entries.
    # One query finds the batch's taken emails and one executemany per table writes the rest,
    # instead of two statements per row: BEGIN IMMEDIATE keeps every other writer out between
    # the check and the insert, so the check decides exactly what ON CONFLICT would have.
    keys = [email_key(user.email) for user in users]
    taken = {
        row[0] for row in writes.conn.execute(queries.SELECT_TAKEN_EMAILS, (json.dumps(keys),))
    }
    subjects = [user.subject for user in users if user.subject]
    owned = (
        {
            row[0]
            for row in writes.conn.execute(queries.SELECT_TAKEN_SUBJECTS, (json.dumps(subjects),))
        }
        if subjects
        else set()
    )
    results: list[User | DomainError] = []
    new: list[User] = []
    for user, key in zip(users, keys, strict=True):
        if key in taken:
            results.append(EmailAlreadyExistsError())
        elif user.subject in owned:
            results.append(SubjectAlreadyExistsError())
        else:
            taken.add(key)  # a later row of the batch with this email is taken too
            if user.subject:
                owned.add(user.subject)
            new.append(user)
            results.append(user)
    writes.insert_new(new)
    return results


def update(
    writes: WriteTransaction,
    user_id: str,
    changes: UserChanges,
    expected_etag: str | None,
    now: int,
    caller: Caller = OPERATOR,
) -> User:
    """Apply changes to the current user after the domain's caller and etag checks."""
    updated = _current(writes, user_id, expected_etag, caller, changes).changed(changes, now)
    writes.overwrite(updated)
    writes.event(EventType.UPDATED, updated, updated.update_time_us)
    writes.cache[user_id] = updated
    return updated


def delete(
    writes: WriteTransaction,
    user_id: str,
    expected_etag: str | None,
    now: int,
    caller: Caller = OPERATOR,
) -> None:
    """Delete the current user after the domain's caller and etag checks, erasing its data."""
    current = _current(writes, user_id, expected_etag, caller)
    writes.conn.execute(queries.DELETE_USER, (user_id,))
    erased = current.erased()
    personal = personal_fields(erased)
    writes.conn.execute(queries.ERASE_EVENTS, (user_id, *personal))
    writes.conn.execute(queries.ERASE_REQUESTS, (user_id, *personal, ERASED))
    writes.event(EventType.DELETED, erased, current.deletion_time(now))
    writes.cache[user_id] = None


def delete_many(writes: WriteTransaction, user_ids: Sequence[str], now: int) -> list[str]:
    """Delete each of these users that exists as delete() does; return the ids deleted."""
    deleted = []
    for user_id in user_ids:
        current = fetch_user(writes.conn, queries.SELECT_USER, user_id)
        if current is not None:
            delete(writes, user_id, None, now)
            deleted.append(user_id)
    return deleted


def upsert_by_email(writes: WriteTransaction, candidate: User) -> tuple[SyncOutcome, User]:
    """Create candidate, or apply the domain's sync decision to the user holding its email."""
    # Reading first is safe here: BEGIN IMMEDIATE and the single writer exclude any other write.
    current = fetch_user(writes.conn, queries.SELECT_USER_BY_EMAIL, email_key(candidate.email))
    if current is None:
        if not writes.insert(candidate):
            raise EmailAlreadyExistsError()
        writes.event(EventType.CREATED, candidate, candidate.create_time_us)
        writes.cache[candidate.id] = candidate
        return SyncOutcome.CREATED, candidate
    outcome, updated = current.synced(candidate)
    if outcome is SyncOutcome.UNCHANGED:
        return outcome, current
    writes.overwrite(updated)
    writes.event(EventType.UPDATED, updated, updated.update_time_us)
    writes.cache[updated.id] = updated
    return SyncOutcome.UPDATED, updated


def _current(
    writes: WriteTransaction,
    user_id: str,
    expected_etag: str | None,
    caller: Caller,
    changes: UserChanges | None = None,
) -> User:
    """Return the stored user the caller may change, or raise what Caller.writable() raises."""
    # Inside BEGIN IMMEDIATE: no other write can change the owner between this and the write.
    current = fetch_user(writes.conn, queries.SELECT_USER, user_id)
    return caller.writable(user_id, current, expected_etag, changes)


def _unique_violation(error: sqlite3.IntegrityError) -> Exception:
    """Return the domain error for a unique index the write hit, or error itself."""
    text = str(error)
    if "users.email_normalized" in text:
        return EmailAlreadyExistsError()
    if "users.subject" in text:
        return SubjectAlreadyExistsError()
    return error


def backfill_keys(conn: sqlite3.Connection) -> int:
    """Compute display_name_key for rows written before it existed, a batch per transaction.

    Runs at open on the writer connection; returns the number of rows keyed.
    """
    keyed, after = 0, ""
    while True:
        rows = conn.execute(queries.SELECT_UNKEYED, (after, BACKFILL_BATCH)).fetchall()
        if not rows:
            return keyed
        with transaction(conn):
            keyed += conn.executemany(queries.SET_KEY, backfilled_keys(rows)).rowcount
        after = rows[-1][0]
