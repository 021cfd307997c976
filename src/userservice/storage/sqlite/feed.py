"""The SQLite store's change feed: commits wake waiting readers in-process, with no query.

With workers (`--workers N`) another process's commit cannot wake this one, so a waiter also
polls the newest sequence in the memory the workers share.
"""

from __future__ import annotations

import asyncio
import contextlib

from userservice.storage.sqlite.shared import POLL_SECONDS, SharedCommits


class CommitSignal:
    """The newest committed sequence, and a wait for a newer one."""

    def __init__(self, latest_sequence: int, shared: SharedCommits | None) -> None:
        """Start from latest_sequence; shared is set when other workers write the file too."""
        self.latest_sequence = latest_sequence
        self._shared = shared
        self._arrived = asyncio.Event()
        self._closed = False

    def committed(self, last_sequence: int) -> None:
        """Record this process's commit and wake every waiter."""
        self.latest_sequence = last_sequence
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    def close(self) -> None:
        """Release every waiter for good."""
        self._closed = True
        self._arrived.set()

    async def wait(self, after_sequence: int, timeout: float) -> None:
        """Return once a sequence above after_sequence may exist, or after timeout seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Without other workers one wait covers it; with them, each wait is one poll.
        step = timeout if self._shared is None else POLL_SECONDS
        while not self._closed and not self._newer_than(after_sequence):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            arrived = self._arrived
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, step)):
                    await arrived.wait()

    def _newer_than(self, sequence: int) -> bool:
        if self.latest_sequence > sequence:
            return True
        return self._shared is not None and self._shared.latest_sequence > sequence
