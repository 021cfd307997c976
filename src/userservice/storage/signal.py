"""The newest committed event sequence, and a wait for a newer one: each store's change feed.

The SQLite store advances it in-process on every commit; the PostgreSQL store on its own
commits and on the LISTEN connection's notices. Where other processes commit too (SQLite
workers), a waiter also polls their newest sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

# How often a waiter looks at what other processes committed.
POLL_SECONDS: Final = 0.02


class SequenceSignal:
    """Knows the newest committed sequence and lets readers wait for a newer one."""

    def __init__(self, latest_sequence: int, elsewhere: Callable[[], int] | None = None) -> None:
        """Start from latest_sequence; elsewhere returns other processes' newest, if any."""
        self.latest_sequence = latest_sequence
        self._elsewhere = elsewhere
        self._changed = asyncio.Event()
        self._closed = False

    def advance(self, sequence: int) -> None:
        """Record that sequence committed and wake every waiter."""
        self.reset(max(self.latest_sequence, sequence))

    def reset(self, sequence: int) -> None:
        """Make sequence the newest (even if lower: a restored database) and wake every waiter."""
        self.latest_sequence = sequence
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """Release every waiter for good."""
        self._closed = True
        self._changed.set()

    async def wait(self, after_sequence: int, timeout: float) -> None:
        """Return once a sequence above after_sequence may exist, or after timeout seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Alone, one wait covers it; with other processes, each wait is one poll.
        step = timeout if self._elsewhere is None else POLL_SECONDS
        while not self._closed and not self._newer_than(after_sequence):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, step)):
                    await changed.wait()

    def _newer_than(self, sequence: int) -> bool:
        if self.latest_sequence > sequence:
            return True
        return self._elsewhere is not None and self._elsewhere() > sequence
