"""The Python client of user.v1.UserService: `UserServiceClient` and its typed errors."""

from userservice.client.client import UserServiceClient
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
from userservice.client.tokens import TokenFile, TokenSource

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
