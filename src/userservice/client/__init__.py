"""The Python client of user.v1.UserService: `UserServiceClient` and its typed errors."""

from userservice.client.client import UserServiceClient
from userservice.client.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    OperationCancelledError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UserServiceError,
    from_rpc_error,
)
from userservice.client.operations import PurgeOperation
from userservice.client.tokens import TokenFile, TokenSource

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "OperationCancelledError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PurgeOperation",
    "ResourceExhaustedError",
    "TokenFile",
    "TokenSource",
    "UnauthenticatedError",
    "UnavailableError",
    "UserServiceClient",
    "UserServiceError",
    "from_rpc_error",
]
