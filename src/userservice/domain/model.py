"""Domain value types shared by the service, the transport and the storage backends."""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass, replace
from typing import Final

from userservice.domain.errors import (
    CreatedUserDeletedError,
    EtagMismatchError,
    RequestIdReusedError,
)

ERASED: Final = ""
"""What a personal field (email, display name, a create's fingerprint) reads as once erased.

No stored user can have it: validation requires an email, so an empty one marks erasure.
"""


class Role(enum.IntEnum):
    """A user's role; values equal the user.v1.UserRole numbers."""

    VIEWER = 1
    EDITOR = 2
    ADMIN = 3


class EventType(enum.IntEnum):
    """Kind of change recorded in the event log; values equal user.v1.UserEventType."""

    CREATED = 1
    UPDATED = 2
    DELETED = 3


def email_key(email: str) -> str:
    """Return the form emails are compared and kept unique in (case-insensitive)."""
    return email.lower()


def search_key(text: str) -> str:
    """Return the form substring filters match in: NFKC, Unicode case folding, NFKC again.

    Folding (not lower()) makes "STRASSE" match "straße" and a final sigma match any sigma;
    NFKC makes a composed "é" equal "e" + combining accent, and a ligature its letters. The
    stores keep this key of each display name in a column and match fragments against it, so
    no database's collation decides (see the README's Storage section).
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return unicodedata.normalize("NFKC", folded)


@dataclass(frozen=True, slots=True)
class User:
    """A stored user. Times are integer microseconds since the Unix epoch (UTC)."""

    id: str
    email: str
    display_name: str
    role: Role
    create_time_us: int
    update_time_us: int
    revision: int

    @property
    def etag(self) -> str:
        """Opaque checksum of this state (AIP-154): changes on every write."""
        return f"{self.revision:x}-{self.update_time_us:x}"

    def changed(self, changes: UserChanges, now_us: int) -> User:
        """Return the next revision with changes applied; update_time always moves forward."""
        return replace(
            self,
            email=self.email if changes.email is None else changes.email,
            display_name=self.display_name
            if changes.display_name is None
            else changes.display_name,
            role=self.role if changes.role is None else changes.role,
            # Clocks can step back (NTP, another replica): the order of writes still shows.
            update_time_us=max(now_us, self.update_time_us + 1),
            revision=self.revision + 1,
        )

    def require_etag(self, expected_etag: str | None) -> None:
        """Raise EtagMismatchError when the caller named an etag that is not the current one."""
        if expected_etag is not None and expected_etag != self.etag:
            raise EtagMismatchError(self.id)

    @property
    def is_erased(self) -> bool:
        """Tell whether this is the erased snapshot of a deleted user (see erased())."""
        return self.email == ERASED

    def erased(self) -> User:
        """Return this snapshot without personal data: what the stores keep once it is deleted.

        The id, role, times and revision stay: they are what a watcher needs to order and
        reconcile events, and they identify nobody without the user row that is gone.
        """
        return replace(self, email=ERASED, display_name=ERASED)

    def deletion_time(self, now_us: int) -> int:
        """Return the time of this user's DELETED event: never before its last update."""
        return max(now_us, self.update_time_us)

    def synced(self, candidate: User) -> tuple[SyncOutcome, User]:
        """Decide an upsert onto this stored user: UNCHANGED, or UPDATED to candidate's fields.

        The stored id, email spelling and create_time stay; candidate.update_time_us is the clock.
        """
        if (self.display_name, self.role) == (candidate.display_name, candidate.role):
            return SyncOutcome.UNCHANGED, self
        changes = UserChanges(display_name=candidate.display_name, role=candidate.role)
        return SyncOutcome.UPDATED, self.changed(changes, candidate.update_time_us)


def retried_create(recorded: User, recorded_fingerprint: str, fingerprint: str) -> User:
    """Return what a CreateUser retry answers from its request_id's record, or raise.

    The user the first call created, if the retry asks for the same thing; a request_id
    whose user was deleted since (its record erased) answers CreatedUserDeletedError
    whatever the retry asks, since the erased record cannot tell a retry from a reuse.
    """
    if recorded.is_erased:
        raise CreatedUserDeletedError()
    if recorded_fingerprint != fingerprint:
        raise RequestIdReusedError()
    return recorded


@dataclass(frozen=True, slots=True)
class NewUser:
    """Validated input for a create: what the caller chose, before the store assigns the rest."""

    email: str
    display_name: str
    role: Role


@dataclass(frozen=True, slots=True)
class UserChanges:
    """Validated field changes for an update; None leaves a field as it is."""

    email: str | None = None
    display_name: str | None = None
    role: Role | None = None


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One entry of the change log that WatchUsers replays and follows."""

    sequence: int
    type: EventType
    user: User
    event_time_us: int

    def erased(self) -> UserEvent:
        """Return this event with its user snapshot erased (sequence, type and time stay)."""
        return replace(self, user=self.user.erased())


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """Sent on an idle watch: every event up to latest_sequence has been delivered."""

    latest_sequence: int


@dataclass(frozen=True, slots=True)
class UserFilter:
    """Parsed ListUsers/StreamUsers filter; every set field must match (AND)."""

    role: Role | None = None
    role_not: Role | None = None
    email_equals: str | None = None
    email_contains: str | None = None
    display_name_contains: str | None = None

    def matches(self, user: User) -> bool:
        """Tell whether user matches: the rule each store's SQL must give the same answer as."""
        return (
            (self.role is None or user.role == self.role)
            and (self.role_not is None or user.role != self.role_not)
            and (self.email_equals is None or email_key(user.email) == email_key(self.email_equals))
            and (
                self.email_contains is None
                or email_key(self.email_contains) in email_key(user.email)
            )
            and (
                self.display_name_contains is None
                or search_key(self.display_name_contains) in search_key(user.display_name)
            )
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a keyset scan in id order."""

    users: list[User]
    has_more: bool
    total_size: int


class SyncOutcome(enum.IntEnum):
    """What an upsert by email did; values equal user.v1.SyncOutcome."""

    CREATED = 1
    UPDATED = 2
    UNCHANGED = 3
