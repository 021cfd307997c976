"""What a failed downstream call means to our own caller: the status to answer with.

A service that calls another must not hand the other's status to its own caller as is:
a downstream ``INVALID_ARGUMENT`` says *we* built a bad request, not that our caller did,
and its message describes the downstream's API, which our caller never saw. The mapping
(after AIP-193's guidance on propagating errors):

- INVALID_ARGUMENT, OUT_OF_RANGE, UNAUTHENTICATED, PERMISSION_DENIED, UNIMPLEMENTED,
  INTERNAL, UNKNOWN, DATA_LOSS (our bug, or our configuration) -> INTERNAL;
- NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION (the state we depend on is not as it
  should be) -> FAILED_PRECONDITION;
- UNAVAILABLE, RESOURCE_EXHAUSTED (try again later) -> UNAVAILABLE, which stays retryable;
- DEADLINE_EXCEEDED, CANCELLED, ABORTED -> the same code.

A code the caller can act on directly (a NOT_FOUND for the id the caller gave) is passed
through with ``passthrough``, with a message of our own. Messages name the dependency,
never the downstream's text or details (log those: ``DownstreamStatus.downstream_details``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

import grpc

from userservice.client.errors import UserServiceError

_Code = grpc.StatusCode
_OURS: Final[dict[grpc.StatusCode, grpc.StatusCode]] = {
    **dict.fromkeys(
        (
            _Code.INVALID_ARGUMENT,
            _Code.OUT_OF_RANGE,
            _Code.UNAUTHENTICATED,
            _Code.PERMISSION_DENIED,
            _Code.UNIMPLEMENTED,
            _Code.INTERNAL,
            _Code.UNKNOWN,
            _Code.DATA_LOSS,
        ),
        _Code.INTERNAL,
    ),
    **dict.fromkeys(
        (_Code.NOT_FOUND, _Code.ALREADY_EXISTS, _Code.FAILED_PRECONDITION),
        _Code.FAILED_PRECONDITION,
    ),
    **dict.fromkeys((_Code.UNAVAILABLE, _Code.RESOURCE_EXHAUSTED), _Code.UNAVAILABLE),
    **{code: code for code in (_Code.DEADLINE_EXCEEDED, _Code.CANCELLED, _Code.ABORTED)},
}
_MESSAGES: Final = {
    _Code.INTERNAL: "the call to {} failed",
    _Code.FAILED_PRECONDITION: "{} does not hold what this request depends on",
    _Code.UNAVAILABLE: "{} is unavailable; try again later",
    _Code.DEADLINE_EXCEEDED: "the call to {} ran out of time",
    _Code.CANCELLED: "the call to {} was cancelled",
    _Code.ABORTED: "the call to {} was aborted by a concurrent change; try again",
}


@dataclasses.dataclass(frozen=True, slots=True)
class DownstreamStatus:
    """The status to answer our caller with, and what the downstream said (for the log only)."""

    code: grpc.StatusCode
    message: str
    downstream_code: grpc.StatusCode
    downstream_details: str


def downstream_status(
    error: grpc.aio.AioRpcError | UserServiceError,
    dependency: str,
    *,
    passthrough: Mapping[grpc.StatusCode, str] | None = None,
) -> DownstreamStatus:
    """Return the status our caller gets for a failed call to dependency (a name to show).

    passthrough maps the downstream codes our caller can act on to our own message for them.
    """
    if isinstance(error, UserServiceError):
        code, details = error.code, error.message
    else:
        code, details = error.code(), error.details() or ""
    if passthrough is not None and code in passthrough:
        return DownstreamStatus(code, passthrough[code], code, details)
    # A code not in the table (none today) is not our caller's to fix either.
    ours = _OURS.get(code, _Code.INTERNAL)
    return DownstreamStatus(ours, _MESSAGES[ours].format(dependency), code, details)
