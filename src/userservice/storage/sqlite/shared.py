"""What the worker processes sharing one SQLite file tell each other: commits and the newest event.

The parent creates it before forking (`--workers N`). A writer bumps it after each commit,
before answering its caller, so a read in any worker that starts after that answer sees the
bump: its cache drops what it held and reads the file, which keeps the cache exact. Watchers
poll the newest sequence, a memory read, instead of querying the file.
"""

from __future__ import annotations

import ctypes
import multiprocessing


class SharedCommits:
    """A commit counter and the newest event sequence in memory shared across forked workers."""

    def __init__(self, latest_sequence: int = 0) -> None:
        """Create the shared memory; call before fork so every worker maps the same pages."""
        context = multiprocessing.get_context("fork")
        self._lock = context.Lock()
        self._values = context.RawArray(ctypes.c_uint64, 2)
        self._values[1] = latest_sequence

    @property
    def commits(self) -> int:
        """Commits any worker has made so far."""
        return int(self._values[0])

    @property
    def latest_sequence(self) -> int:
        """The newest event sequence any worker has committed."""
        return int(self._values[1])

    def committed(self, last_sequence: int) -> int:
        """Record a commit (and its newest sequence); return the commit count it made."""
        with self._lock:
            self._values[0] += 1
            if last_sequence > self._values[1]:
                self._values[1] = last_sequence
            return int(self._values[0])
