"""The outcome of a bulk import: how many rows were created, and the first rejections."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from userservice.domain.errors import DomainError

MAX_REPORTED_REJECTIONS = 1000


@dataclass(slots=True)
class ImportResult:
    """Outcome of a bulk import: counts and the lowest-index rejections with their stream index.

    Validation rejects a row when it arrives, the store only when its batch flushes, so
    rejections do not come in index order: a max-heap keeps the MAX_REPORTED_REJECTIONS
    lowest indices (O(log n) per rejection, bounded memory).
    """

    created_count: int = 0
    rejected_count: int = 0
    _kept: list[tuple[int, int, DomainError]] = field(default_factory=list)

    def reject(self, index: int, error: DomainError) -> None:
        """Count a rejected row, keeping its details if it is among the lowest indices."""
        self.rejected_count += 1
        entry = (-index, self.rejected_count, error)
        if len(self._kept) < MAX_REPORTED_REJECTIONS:
            heapq.heappush(self._kept, entry)
        elif index < -self._kept[0][0]:
            heapq.heapreplace(self._kept, entry)

    @property
    def rejections(self) -> list[tuple[int, DomainError]]:
        """Return the kept rejections, lowest index first."""
        return [(-negated, error) for negated, _, error in sorted(self._kept, reverse=True)]
