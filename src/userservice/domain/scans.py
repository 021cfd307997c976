"""Fair cost for expensive reads: how many scans one principal, and the replica, run at once.

A scan (``UserFilter.is_scan``: a substring term) can read the whole table for one page
and count it, at the same one token a point read pays. Without a bound, one caller's
concurrent scans hold every PostgreSQL pool connection, or queue on SQLite's one reader
thread, and everyone else's reads wait behind them. The gate admits a scan only while
its principal and the replica are under their limits, and refuses it at once otherwise
(TooManyScansError: RESOURCE_EXHAUSTED with RetryInfo), so the queue never grows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

from userservice.domain.errors import TooManyScansError

DEFAULT_SCANS_PER_PRINCIPAL: Final = 2
DEFAULT_SCANS: Final = 4


class ScanGate:
    """Counts scans in progress, per principal and in all; belongs to the event loop thread."""

    def __init__(
        self, per_principal: int = DEFAULT_SCANS_PER_PRINCIPAL, total: int = DEFAULT_SCANS
    ) -> None:
        """Admit at most per_principal scans per principal and total in all (both positive)."""
        if per_principal < 1 or total < 1:
            raise ValueError("scan limits must be positive")
        self.per_principal = per_principal
        self.total = total
        self.running = 0
        self._by_principal: dict[str | None, int] = {}

    @contextlib.contextmanager
    def admit(self, principal: str | None) -> Iterator[None]:
        """Run the body as one scan of principal's, or raise TooManyScansError at once.

        principal None (a call without one) shares one count with every such call.
        """
        held = self._by_principal.get(principal, 0)
        if held >= self.per_principal:
            raise TooManyScansError("max_scans_per_principal", self.per_principal)
        if self.running >= self.total:
            raise TooManyScansError("max_scans", self.total)
        self._by_principal[principal] = held + 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            left = self._by_principal[principal] - 1
            if left:
                self._by_principal[principal] = left
            else:
                del self._by_principal[principal]
