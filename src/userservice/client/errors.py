"""Failed calls as typed exceptions carrying the decoded google.rpc details."""

from __future__ import annotations

import dataclasses
from typing import Any

# One module per import: mypy resolves google.rpc only this way (see transport/errors.py).
import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
from grpc_status import rpc_status


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One google.rpc.BadRequest field violation."""

    field: str
    description: str


class UserServiceError(Exception):
    """A call failed; code, message and the decoded ErrorInfo, BadRequest and RetryInfo."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
        resource_name: str = "",
    ) -> None:
        """Hold the status and its details; str() reads like the server's message."""
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.violations = violations
        self.retry_delay = retry_delay
        self.resource_name = resource_name


class InvalidArgumentError(UserServiceError):
    """INVALID_ARGUMENT: the request is wrong; `violations` says which fields."""


class NotFoundError(UserServiceError):
    """NOT_FOUND: no such resource."""


class AlreadyExistsError(UserServiceError):
    """ALREADY_EXISTS: a unique field (the email) is taken."""


class AbortedError(UserServiceError):
    """ABORTED: the etag did not match; read again and retry."""


class OutOfRangeError(UserServiceError):
    """OUT_OF_RANGE: e.g. a watch resumed from a sequence that is no longer kept."""


class UnauthenticatedError(UserServiceError):
    """UNAUTHENTICATED: missing, invalid or expired token."""


class PermissionDeniedError(UserServiceError):
    """PERMISSION_DENIED: the token lacks the scope the method needs."""


class ResourceExhaustedError(UserServiceError):
    """RESOURCE_EXHAUSTED: rate limited; `retry_delay` says when tokens are back."""


class UnavailableError(UserServiceError):
    """UNAVAILABLE: no replica could take the call; retrying later is safe for reads."""


class DeadlineExceededError(UserServiceError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class FailedPreconditionError(UserServiceError):
    """FAILED_PRECONDITION: e.g. deleting an operation that has not finished."""


class OperationCancelledError(UserServiceError):
    """CANCELLED: a long-running operation ended because it was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[UserServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.CANCELLED: OperationCancelledError,
}
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_rpc_error(error: grpc.aio.AioRpcError) -> UserServiceError:
    """Return the typed exception for a failed call, with its rich details decoded."""
    status = rpc_status.from_call(error)
    return _typed(error.code(), error.details() or "", status)


def from_status(status: status_pb2.Status) -> UserServiceError:
    """Return the typed exception for a google.rpc.Status (a long-running operation's error)."""
    code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    return _typed(code, status.message, status)


def _typed(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | None
) -> UserServiceError:
    fields: dict[str, object] = {}
    # Any: the stubs type Any.Is's argument more narrowly than the descriptors they give.
    details: list[Any] = [] if status is None else list(status.details)
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            fields.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields["violations"] = tuple(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            fields["retry_delay"] = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            fields["resource_name"] = resource.resource_name
    kind = _BY_CODE.get(code, UserServiceError)
    return kind(code, message, **fields)  # type: ignore[arg-type]
