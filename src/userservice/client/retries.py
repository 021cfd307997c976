"""The client's own retries, beside grpc core's: RetryInfo waits and etag-guarded writes."""

from __future__ import annotations

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
