"""The Python client of user.v1.UserService: `UserServiceClient` and its typed errors."""

from userservice.client.client import TokenFile, TokenSource, UserServiceClient
from userservice.client.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UserServiceError,
    from_rpc_error,
)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TokenFile",
    "TokenSource",
    "UnauthenticatedError",
    "UnavailableError",
    "UserServiceClient",
    "UserServiceError",
    "from_rpc_error",
]
