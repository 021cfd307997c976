"""Every typed domain error maps to the status that tells the truth, with or without RetryInfo.

Storage raises these (see the README errors table); the mapping itself is checked here.
"""

from __future__ import annotations

import google.rpc.error_details_pb2 as error_details_pb2
import grpc
import pytest

from userservice.domain.errors import (
    CommitOutcomeUnknownError,
    ConcurrentConflictError,
    DomainError,
    ShuttingDownError,
    StorageBusyError,
    StorageTimeoutError,
    StorageUnavailableError,
)
from userservice.transport.errors import status_code, status_proto


def _retry_info(error: DomainError) -> error_details_pb2.RetryInfo | None:
    for detail in status_proto(error).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    return None


def _reason(error: DomainError) -> str:
    info = error_details_pb2.ErrorInfo()
    assert status_proto(error).details[0].Unpack(info)
    return str(info.reason)


@pytest.mark.parametrize(
    ("error", "code", "reason", "retry"),
    [
        (StorageUnavailableError(), grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", True),
        (StorageBusyError(), grpc.StatusCode.UNAVAILABLE, "STORAGE_BUSY", True),
        (ShuttingDownError(), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", True),
        (StorageTimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "STORAGE_TIMEOUT", False),
        (ConcurrentConflictError(), grpc.StatusCode.ABORTED, "CONCURRENT_CONFLICT", False),
        (
            CommitOutcomeUnknownError(),
            grpc.StatusCode.UNAVAILABLE,
            "COMMIT_OUTCOME_UNKNOWN",
            False,
        ),
    ],
)
def test_storage_failures_map_to_truthful_statuses(
    error: DomainError, code: grpc.StatusCode, reason: str, retry: bool
) -> None:
    assert status_code(error) is code
    assert _reason(error) == reason
    assert (_retry_info(error) is not None) is retry


def test_commit_outcome_unknown_tells_the_client_what_is_safe() -> None:
    assert "request_id" in status_proto(CommitOutcomeUnknownError()).message
