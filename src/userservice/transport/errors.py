"""Domain errors → gRPC status codes with google.rpc rich details (via grpcio-status)."""

from __future__ import annotations

# One module per import: mypy resolves google.rpc (a namespace package whose
# stubs lack py.typed) only this way.
import google.rpc.code_pb2 as code_pb2
import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
from google.protobuf import any_pb2, duration_pb2
from grpc_status import rpc_status

from userservice.domain.errors import (
    ERROR_DOMAIN,
    AdminOnlyFieldError,
    CommitOutcomeUnknownError,
    ConcurrentConflictError,
    CreatedUserDeletedError,
    DomainError,
    EmailAlreadyExistsError,
    EtagMismatchError,
    InvalidArgumentError,
    NotOwnerError,
    OperationCancelledError,
    OperationFailedError,
    OperationNotDoneError,
    OperationNotFoundError,
    RequestIdReusedError,
    SequenceBeyondLatestError,
    SequenceExpiredError,
    ShuttingDownError,
    StorageBusyError,
    StorageTimeoutError,
    StorageUnavailableError,
    SubjectAlreadyExistsError,
    TooManyScansError,
    UserNotFoundError,
)
from userservice.rpc_context import with_request_id

USER_RESOURCE_TYPE = "user.v1.User"
OPERATION_RESOURCE_TYPE = "google.longrunning.Operation"
_RETRY_AFTER_UNAVAILABLE = duration_pb2.Duration(seconds=1)
# A scan ends within the statement budget; most within well under a second.
_RETRY_AFTER_SCANS = duration_pb2.Duration(seconds=1)

_CODES: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    RequestIdReusedError: grpc.StatusCode.INVALID_ARGUMENT,
    UserNotFoundError: grpc.StatusCode.NOT_FOUND,
    # The user the request_id created does not exist any more; not retryable with that id.
    CreatedUserDeletedError: grpc.StatusCode.NOT_FOUND,
    EmailAlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    SubjectAlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    # No ResourceInfo for NotOwnerError: its details must not differ between a user that
    # exists and one that does not.
    NotOwnerError: grpc.StatusCode.PERMISSION_DENIED,
    AdminOnlyFieldError: grpc.StatusCode.PERMISSION_DENIED,
    EtagMismatchError: grpc.StatusCode.ABORTED,
    SequenceExpiredError: grpc.StatusCode.OUT_OF_RANGE,
    SequenceBeyondLatestError: grpc.StatusCode.OUT_OF_RANGE,
    TooManyScansError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageUnavailableError: grpc.StatusCode.UNAVAILABLE,
    # UNAVAILABLE, not RESOURCE_EXHAUSTED: nothing ran, another replica may have a free
    # connection, and gRPC retry policies and proxies retry UNAVAILABLE there by default.
    StorageBusyError: grpc.StatusCode.UNAVAILABLE,
    # The query was too expensive, not the store unreachable: no RetryInfo invites a retry.
    StorageTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    # The write may have happened: no RetryInfo; docs/api.md says what is safe to retry.
    CommitOutcomeUnknownError: grpc.StatusCode.UNAVAILABLE,
    ConcurrentConflictError: grpc.StatusCode.ABORTED,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    # The same answer for an operation that does not exist and one the caller may not see.
    OperationNotFoundError: grpc.StatusCode.NOT_FOUND,
    # AIP-151/AIP-135: an unfinished operation cannot be deleted; cancel it first.
    OperationNotDoneError: grpc.StatusCode.FAILED_PRECONDITION,
    # Only ever an operation's result (Operation.error), never a call's status.
    OperationCancelledError: grpc.StatusCode.CANCELLED,
    OperationFailedError: grpc.StatusCode.INTERNAL,
}
# Only these promise that a retry after RetryInfo's delay is safe and may succeed.
_RETRY_SAFE = frozenset({StorageUnavailableError, StorageBusyError, ShuttingDownError})


def status_code(error: DomainError) -> grpc.StatusCode:
    """Return the gRPC code a domain error maps to."""
    return _CODES.get(type(error), grpc.StatusCode.INTERNAL)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _details(error: DomainError) -> list[any_pb2.Any]:
    metadata: dict[str, str] = {}
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgumentError):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=violation.field, description=violation.description
                        )
                        for violation in error.reported
                    ]
                )
            )
        )
        if len(error.violations) > len(error.reported):
            metadata["field_violations"] = str(len(error.violations))
    elif isinstance(error, UserNotFoundError | EtagMismatchError):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=USER_RESOURCE_TYPE,
                    resource_name=error.user_id,
                    description=error.message,
                )
            )
        )
    elif isinstance(error, OperationNotFoundError | OperationNotDoneError):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=OPERATION_RESOURCE_TYPE,
                    resource_name=error.name,
                    description=error.message,
                )
            )
        )
    elif isinstance(error, AdminOnlyFieldError):
        metadata["field"] = error.field
    elif isinstance(error, SequenceExpiredError):
        metadata["oldest_sequence"] = str(error.oldest)
    elif isinstance(error, SequenceBeyondLatestError):
        metadata["latest_sequence"] = str(error.latest)
    elif isinstance(error, TooManyScansError):
        metadata.update(limit=error.limit, value=str(error.value))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=_RETRY_AFTER_SCANS)))
    elif type(error) in _RETRY_SAFE:
        # A watch it ended: where to resume, also for a watch that was sent no event yet.
        if (
            isinstance(error, ShuttingDownError | StorageUnavailableError)
            and error.last_sequence is not None
        ):
            metadata["last_sequence"] = str(error.last_sequence)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=_RETRY_AFTER_UNAVAILABLE)))
    details.insert(
        0,
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
        ),
    )
    return details


def status_proto(error: DomainError) -> status_pb2.Status:
    """Return the google.rpc.Status for a domain error (also used inside stream responses)."""
    code = status_code(error)
    return status_pb2.Status(
        code=getattr(code_pb2, code.name),
        message=error.message,
        details=_details(error),
    )


async def abort_with_domain_error(
    context: grpc.aio.ServicerContext[object, object], error: DomainError
) -> None:
    """End the call with the mapped status and rich details; never returns."""
    status = rpc_status.to_status(status_proto(error))
    await context.abort(status.code, status.details, with_request_id(status.trailing_metadata))
