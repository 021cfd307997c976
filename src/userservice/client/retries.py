"""The client's own retries beside grpc core's: RetryInfo waits, guarded writes, watch resumes."""

from __future__ import annotations

import dataclasses
import random
from typing import Final

import grpc

from userservice.client.errors import UserServiceError

_RETRY_BACKOFF_SECONDS: Final = (0.1, 1.0)


def retry_delay(error: UserServiceError, attempt: int, retry_unavailable: bool) -> float | None:
    """Return how long to wait before attempt + 1 of a unary call, or None to give up.

    RESOURCE_EXHAUSTED waits its RetryInfo delay; UNAVAILABLE, when retry_unavailable,
    backs off exponentially with full jitter.
    """
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is not None:
        return error.retry_delay
    if error.code == grpc.StatusCode.UNAVAILABLE and retry_unavailable:
        low, high = _RETRY_BACKOFF_SECONDS
        return random.uniform(0, min(high, low * 2 ** (attempt - 1)))
    return None


WATCH_RESUME_ATTEMPTS: Final = 10
"""Resumes of one watch in a row that deliver nothing before watch_users raises."""
_WATCH_BACKOFF_SECONDS: Final = (0.1, 5.0)
# Whatever the status names, resuming cannot fix these: the request, the caller or the
# history is wrong (an expired token is handled apart: a new one may fix it).
_NEVER_RESUMED: Final = frozenset(
    {
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a watch that ended resumes: after last_sequence, or (None) after its last event."""

    last_sequence: int | None


def watch_resume_point(error: UserServiceError) -> ResumePoint | None:
    """Return where a watch that ended with error resumes, or None if it must not.

    A server names the last sequence it sent in ErrorInfo.metadata.last_sequence on every
    end of a watch it may be resumed from; an UNAVAILABLE without it (a connection lost, a
    replica gone) resumes after the last event the stream delivered.
    """
    if error.code in _NEVER_RESUMED:
        return None
    named = error.metadata.get("last_sequence", "")
    if named.isdigit():
        return ResumePoint(int(named))
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return ResumePoint(None)
    return None


def watch_resume_delay(failures: int) -> float:
    """Return how long to wait before resuming a watch after failures ends in a row."""
    low, high = _WATCH_BACKOFF_SECONDS
    ceiling = min(high, low * 2 ** (failures - 1))
    # Never at once, so replicas going away together are not reconnected to in a burst.
    return random.uniform(ceiling / 2, ceiling)
