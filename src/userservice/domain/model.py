"""Domain value types shared by the service, the transport and the storage backends."""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass, replace
from typing import Final

from userservice.domain.errors import (
    AdminOnlyFieldError,
    CreatedUserDeletedError,
    EtagMismatchError,
    NotOwnerError,
    RequestIdReusedError,
    UserNotFoundError,
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
    no database's collation decides (see docs/storage.md).
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
    subject: str = ""
    """The identity-provider subject (a token's sub) the user belongs to; "" for no one."""

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
            subject=self.subject if changes.subject is None else changes.subject,
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
        reconcile events, and they identify nobody without the user row that is gone. The
        subject goes with the email: an identity provider's id for the person is personal data.
        """
        return replace(self, email=ERASED, display_name=ERASED, subject=ERASED)

    def deletion_time(self, now_us: int) -> int:
        """Return the time of this user's DELETED event: never before its last update."""
        return max(now_us, self.update_time_us)

    def synced(self, candidate: User) -> tuple[SyncOutcome, User]:
        """Decide an upsert onto this stored user: UNCHANGED, or UPDATED to candidate's fields.

        The stored id, email spelling and create_time stay; candidate.update_time_us is the clock.
        A candidate without a subject leaves the stored one as it is.
        """
        subject = candidate.subject or self.subject
        if (self.display_name, self.role, self.subject) == (
            candidate.display_name,
            candidate.role,
            subject,
        ):
            return SyncOutcome.UNCHANGED, self
        changes = UserChanges(
            display_name=candidate.display_name, role=candidate.role, subject=subject
        )
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
    subject: str = ""

    def user(self, user_id: str, now_us: int) -> User:
        """Return the user this creates: its first revision, created and updated now."""
        return User(
            id=user_id,
            email=self.email,
            display_name=self.display_name,
            role=self.role,
            create_time_us=now_us,
            update_time_us=now_us,
            revision=1,
            subject=self.subject,
        )


@dataclass(frozen=True, slots=True)
class UserChanges:
    """Validated field changes for an update; None leaves a field as it is ("" clears subject)."""

    email: str | None = None
    display_name: str | None = None
    role: Role | None = None
    subject: str | None = None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a call, as the transport authenticated it; holds every authorization rule.

    users.admin (admin) may do anything to any user. Anyone else is self-service: it may
    create, change and delete only the user whose subject is its own, and may never give
    role or subject a value other than the one it already has (on create: the default role
    and its own subject). The stores call writable() inside the write's transaction, next to
    the etag check, so ownership cannot change between the check and the write.
    """

    subject: str
    admin: bool = False

    def owns(self, user: User) -> bool:
        """Tell whether user belongs to this caller (never true for a caller without subject)."""
        return bool(self.subject) and user.subject == self.subject

    def new_user(self, new: NewUser) -> NewUser:
        """Return what this caller may create from new: its own user, unless it is an admin."""
        if self.admin:
            return new
        if new.role is not Role.VIEWER:
            raise AdminOnlyFieldError("user.role")
        if not self.subject or new.subject not in ("", self.subject):
            raise AdminOnlyFieldError("user.subject")
        return replace(new, subject=self.subject)

    def writable(
        self,
        user_id: str,
        current: User | None,
        expected_etag: str | None,
        changes: UserChanges | None = None,
    ) -> User:
        """Return the stored user this caller may change as asked, or raise why not.

        For a non-admin a missing user and someone else's are the same NotOwnerError, checked
        before the etag, so neither the status nor the etag check tells an id exists.
        """
        if current is None:
            raise UserNotFoundError(user_id) if self.admin else NotOwnerError(user_id)
        if not self.admin:
            if not self.owns(current):
                raise NotOwnerError(user_id)
            if changes is not None:
                if changes.role is not None and changes.role != current.role:
                    raise AdminOnlyFieldError("user.role")
                if changes.subject is not None and changes.subject != current.subject:
                    raise AdminOnlyFieldError("user.subject")
        current.require_etag(expected_etag)
        return current


OPERATOR: Final = Caller("", admin=True)
"""The caller of in-process writes that no request made (the stores' own tests and tools)."""


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

    @property
    def is_scan(self) -> bool:
        """Tell whether matching needs every row read: a substring term, which no index serves.

        The one rule of what a filtered read costs, for both stores: such a call may read
        the whole table for one page (and count it), where other filters read an index.
        """
        return self.email_contains is not None or self.display_name_contains is not None

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
