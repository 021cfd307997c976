"""The client of user.v1.UserService, its typed errors, and what inter-service calls need."""

from userservice.client.client import UserServiceClient
from userservice.client.downstream import DownstreamStatus, downstream_status
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
from userservice.client.propagation import BudgetSpentError, propagation_interceptors
from userservice.client.tokens import TokenFile, TokenSource

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "BudgetSpentError",
    "DeadlineExceededError",
    "DownstreamStatus",
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
    "downstream_status",
    "from_rpc_error",
    "propagation_interceptors",
]
