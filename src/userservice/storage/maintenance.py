"""When both stores delete expired request_ids: rarely, and a bounded batch at a time."""

from __future__ import annotations

import time
from typing import Final

from userservice.domain.ids import now_us

# A sweep runs at most once per interval (or per retention, if shorter), deleting at most
# a batch, so no request pays for a long delete. A full batch means a
# backlog (a lowered retention, a table from before keys expired), worked off one batch per
# pause.
EXPIRE_INTERVAL_SECONDS: Final = 60.0
EXPIRE_BACKLOG_PAUSE_SECONDS: Final = 0.05
EXPIRE_BATCH: Final = 1_000


class ExpirySchedule:
    """Tells when the next sweep of expired request_ids is due, and from which time keys expire."""

    def __init__(self, retention_seconds: float) -> None:
        """Expire keys older than retention_seconds; the first sweep is due at once."""
        if not retention_seconds > 0:
            raise ValueError("request_id_retention_seconds must be positive")
        self.retention_us = max(1, round(retention_seconds * 1_000_000))
        self._interval = min(EXPIRE_INTERVAL_SECONDS, retention_seconds)
        self._next = 0.0

    def due(self) -> bool:
        """Tell whether a sweep should run now."""
        return time.monotonic() >= self._next

    def cutoff_us(self) -> int:
        """Return the creation time before which a key has expired."""
        return now_us() - self.retention_us

    def started(self) -> None:
        """Record that a sweep began, so no second one starts before the interval."""
        self._next = time.monotonic() + self._interval

    def swept(self, deleted: int) -> bool:
        """Record one batch's result; tell whether a backlog remains (then due again soon)."""
        backlog = deleted >= EXPIRE_BATCH
        pause = EXPIRE_BACKLOG_PAUSE_SECONDS if backlog else self._interval
        self._next = time.monotonic() + pause
        return backlog
