"""Which ends of a watch the shipped client resumes, and from where."""

from __future__ import annotations

import grpc
import pytest

from userservice.client import UserServiceError
from userservice.client.retries import ResumePoint, watch_resume_delay, watch_resume_point


def ended(code: grpc.StatusCode, reason: str = "", **metadata: str) -> UserServiceError:
    """A watch's end as the client decodes it from the status."""
    return UserServiceError(code, "ended", reason=reason, metadata=metadata)


@pytest.mark.parametrize(
    ("error", "point"),
    [
        # A replica shutting down, or the store gone: the server names what it sent.
        (ended(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", last_sequence="41"), ResumePoint(41)),
        (
            ended(grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", last_sequence="0"),
            ResumePoint(0),
        ),
        # An older server ending a slow watcher.
        (
            ended(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW", last_sequence="7"),
            ResumePoint(7),
        ),
        # A connection lost: after the last event the stream delivered.
        (ended(grpc.StatusCode.UNAVAILABLE), ResumePoint(None)),
    ],
)
def test_an_end_with_a_resume_point_is_resumed_from_it(
    error: UserServiceError, point: ResumePoint
) -> None:
    assert watch_resume_point(error) == point


@pytest.mark.parametrize(
    "error",
    [
        ended(grpc.StatusCode.OUT_OF_RANGE, "SEQUENCE_EXPIRED", oldest_sequence="90"),
        ended(grpc.StatusCode.OUT_OF_RANGE, "SEQUENCE_BEYOND_LATEST", latest_sequence="3"),
        ended(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        ended(grpc.StatusCode.PERMISSION_DENIED, last_sequence="5"),
        ended(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED", last_sequence="5"),
        # Refused before it began (over a quota): no position to resume from.
        ended(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS"),
        ended(grpc.StatusCode.INTERNAL),
    ],
)
def test_an_end_no_resume_can_fix_is_not_resumed(error: UserServiceError) -> None:
    assert watch_resume_point(error) is None


def test_resumes_back_off_to_a_ceiling_and_never_go_at_once() -> None:
    delays = [watch_resume_delay(failures) for failures in range(1, 20)]
    assert all(0 < delay <= 5.0 for delay in delays)
    assert delays[0] <= 0.1
    assert min(delays[-5:]) >= 2.5
