"""Typed domain errors with stable reason codes; transport maps them to gRPC statuses."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Final

ERROR_DOMAIN: Final = "userservice"
"""The domain of every google.rpc.ErrorInfo this service sends: reasons are unique within it."""


class Reason(enum.StrEnum):
    """Stable machine-readable reasons, sent to clients in google.rpc.ErrorInfo."""

    USER_NOT_FOUND = "USER_NOT_FOUND"
    EMAIL_ALREADY_EXISTS = "EMAIL_ALREADY_EXISTS"
    ETAG_MISMATCH = "ETAG_MISMATCH"
    INVALID_FIELD = "INVALID_FIELD"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"  # noqa: S105 (a reason code, not a secret)
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    CREATED_USER_DELETED = "CREATED_USER_DELETED"
    SEQUENCE_EXPIRED = "SEQUENCE_EXPIRED"
    SEQUENCE_BEYOND_LATEST = "SEQUENCE_BEYOND_LATEST"
    TOO_MANY_SCANS = "TOO_MANY_SCANS"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    STORAGE_BUSY = "STORAGE_BUSY"
    STORAGE_TIMEOUT = "STORAGE_TIMEOUT"
    CONCURRENT_CONFLICT = "CONCURRENT_CONFLICT"
    COMMIT_OUTCOME_UNKNOWN = "COMMIT_OUTCOME_UNKNOWN"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    NOT_OWNER = "NOT_OWNER"
    ADMIN_ONLY_FIELD = "ADMIN_ONLY_FIELD"
    SUBJECT_ALREADY_EXISTS = "SUBJECT_ALREADY_EXISTS"
    OPERATION_NOT_FOUND = "OPERATION_NOT_FOUND"
    OPERATION_NOT_DONE = "OPERATION_NOT_DONE"
    OPERATION_CANCELLED = "OPERATION_CANCELLED"
    OPERATION_FAILED = "OPERATION_FAILED"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    reason: Reason
    default_message: ClassVar[str]
    """The message of a class whose message says all there is (set where it has one)."""

    def __init__(self, message: str | None = None) -> None:
        text = self.default_message if message is None else message
        super().__init__(text)
        self.message = text


MAX_REPORTED_VIOLATIONS = 20
"""At most this many field violations are sent (BadRequest, message); the total is stated."""
MAX_FIELD_BYTES = 64
MAX_DESCRIPTION_BYTES = 100
MAX_MESSAGE_BYTES = 400
"""Bounds, in UTF-8 bytes, that keep any error's trailers far below grpc's 8 KiB soft limit."""


def clip(text: str, limit: int) -> str:
    """Return text cut to at most limit UTF-8 bytes (on a character boundary), marked with …."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text
    # "…" is 3 bytes; a cut inside a character drops that character.
    return encoded[: max(limit - 3, 0)].decode("utf-8", "ignore") + "…"


class InvalidArgumentError(DomainError):
    """The request is malformed; carries one violation per bad field.

    However many there are, the message and ``reported`` hold at most
    MAX_REPORTED_VIOLATIONS of them, each clipped, and say how many there were in all.
    """

    def __init__(
        self,
        violations: list[FieldViolation],
        reason: Reason = Reason.INVALID_FIELD,
    ) -> None:
        self.reported = [
            FieldViolation(
                clip(v.field, MAX_FIELD_BYTES), clip(v.description, MAX_DESCRIPTION_BYTES)
            )
            for v in violations[:MAX_REPORTED_VIOLATIONS]
        ]
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.reported)
        if len(violations) > len(self.reported):
            summary = f"{len(violations)} violations, the first {len(self.reported)}: {summary}"
        super().__init__(clip(f"invalid request: {summary}", MAX_MESSAGE_BYTES))
        self.reason = reason
        self.violations = violations

    @classmethod
    def single(
        cls, field: str, description: str, reason: Reason = Reason.INVALID_FIELD
    ) -> InvalidArgumentError:
        """Build the error for one bad field."""
        return cls([FieldViolation(field, description)], reason)


class UserNotFoundError(DomainError):
    """No user has the requested id."""

    reason = Reason.USER_NOT_FOUND

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id!r} not found")
        self.user_id = user_id


class EmailAlreadyExistsError(DomainError):
    """Another user already has this email (compared without regard to case)."""

    reason = Reason.EMAIL_ALREADY_EXISTS
    default_message = "a user with this email already exists"


class SubjectAlreadyExistsError(DomainError):
    """Another user already belongs to this subject (one user per identity-provider subject)."""

    reason = Reason.SUBJECT_ALREADY_EXISTS
    default_message = "a user with this subject already exists"


class PermissionDeniedError(DomainError):
    """The caller is authenticated and holds the method's scope, but may not do this."""


class NotOwnerError(PermissionDeniedError):
    """A non-admin caller named a user that is not its own, or one that does not exist.

    One message for both, naming only what the caller sent, so that a refusal does not tell
    whether the id exists (AIP-211).
    """

    reason = Reason.NOT_OWNER

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id!r} is not the caller's own user, or does not exist")
        self.user_id = user_id


class AdminOnlyFieldError(PermissionDeniedError):
    """A non-admin caller tried to give a field a value only users.admin may give it."""

    reason = Reason.ADMIN_ONLY_FIELD

    def __init__(self, field: str) -> None:
        super().__init__(f"only a caller with users.admin may set {field} to this value")
        self.field = field


class EtagMismatchError(DomainError):
    """The caller's etag is not the user's current one: re-read and retry."""

    reason = Reason.ETAG_MISMATCH

    def __init__(self, user_id: str) -> None:
        super().__init__(f"etag does not match the current state of user {user_id!r}")
        self.user_id = user_id


class RequestIdReusedError(InvalidArgumentError):
    """An idempotency key was reused for a different request."""

    def __init__(self) -> None:
        super().__init__(
            [FieldViolation("request_id", "was already used for a different user")],
            Reason.REQUEST_ID_REUSED,
        )


class CreatedUserDeletedError(DomainError):
    """A CreateUser retry whose request_id created a user that has since been deleted.

    The first response cannot be repeated (its personal data is erased) and the user must not
    come back by a retry, so the retry fails; a new request_id creates the user afresh.
    """

    reason = Reason.CREATED_USER_DELETED
    default_message = (
        "the user this request_id created has since been deleted; "
        "send a new request_id to create it again"
    )


class SequenceExpiredError(DomainError):
    """A watch asked to resume before the oldest retained event."""

    reason = Reason.SEQUENCE_EXPIRED

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(
            f"events after sequence {requested} are no longer retained; oldest is {oldest}"
        )
        self.requested = requested
        self.oldest = oldest


class SequenceBeyondLatestError(DomainError):
    """A watch asked to resume after a sequence the log has not reached (a restored backup?)."""

    reason = Reason.SEQUENCE_BEYOND_LATEST

    def __init__(self, requested: int, latest: int) -> None:
        super().__init__(
            f"sequence {requested} is beyond the latest sequence {latest}; "
            "resume from a sequence this log issued"
        )
        self.requested = requested
        self.latest = latest


class TooManyScansError(DomainError):
    """The caller, or this replica, already has as many scans in progress as allowed."""

    reason = Reason.TOO_MANY_SCANS

    def __init__(self, limit: str, value: int) -> None:
        whose = "this caller" if limit == "max_scans_per_principal" else "this server"
        super().__init__(
            f"too many filtered scans in progress for {whose} (limit {value}); "
            "retry later, or filter by exact email or role, which read no whole table"
        )
        self.limit = limit
        self.value = value


class StorageUnavailableError(DomainError):
    """The store cannot be reached right now; the call may be retried.

    A watch it ends names last_sequence, the last event it was sent: resume after it.
    """

    reason = Reason.STORAGE_UNAVAILABLE
    default_message = "storage is temporarily unavailable"

    def __init__(self, message: str | None = None, *, last_sequence: int | None = None) -> None:
        super().__init__(message)
        self.last_sequence = last_sequence


class StorageBusyError(StorageUnavailableError):
    """No storage connection became free in time: nothing ran, the call may be retried."""

    reason = Reason.STORAGE_BUSY
    default_message = "storage is busy: no connection free in time"


class StorageTimeoutError(StorageUnavailableError):
    """A statement ran past the storage statement timeout; retrying would cost as much again."""

    reason = Reason.STORAGE_TIMEOUT
    default_message = "the query took longer than the storage allows"


class CommitOutcomeUnknownError(StorageUnavailableError):
    """The connection was lost during COMMIT: the write may or may not have happened."""

    reason = Reason.COMMIT_OUTCOME_UNKNOWN
    default_message = (
        "connection lost during commit: the change may have been applied; "
        "retry only with the same request_id or etag"
    )


class ConcurrentConflictError(DomainError):
    """A concurrent transaction won (serialization failure, deadlock, upsert race) after retries."""

    reason = Reason.CONCURRENT_CONFLICT
    default_message = "the change conflicted with a concurrent one"


class ShuttingDownError(DomainError):
    """The server is draining; the client should reconnect elsewhere.

    A watch it ends names last_sequence, the last event it was sent: resume after it.
    """

    reason = Reason.SHUTTING_DOWN
    default_message = "server is shutting down"

    def __init__(self, *, last_sequence: int | None = None) -> None:
        super().__init__()
        self.last_sequence = last_sequence


class OperationNotFoundError(DomainError):
    """No operation has this name, or the caller may not see it (the same answer for both)."""

    reason = Reason.OPERATION_NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"operation {clip(name, MAX_FIELD_BYTES)!r} not found")
        self.name = name


class OperationNotDoneError(DomainError):
    """The operation is still running: only a finished operation can be deleted."""

    reason = Reason.OPERATION_NOT_DONE

    def __init__(self, name: str) -> None:
        super().__init__(f"operation {name!r} is still running: cancel it, then delete it")
        self.name = name


class OperationCancelledError(DomainError):
    """The result of an operation that was cancelled before it finished."""

    reason = Reason.OPERATION_CANCELLED
    default_message = "the operation was cancelled"


class OperationFailedError(DomainError):
    """The result of an operation that failed for a reason of the service, not the request."""

    reason = Reason.OPERATION_FAILED
    default_message = "the operation failed"
