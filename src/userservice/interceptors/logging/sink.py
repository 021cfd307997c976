"""Where access lines go: stderr, in short batches."""

from __future__ import annotations

import asyncio
import sys
from typing import Final

from userservice.metrics import ACCESS_LOG_ERRORS


class BufferedStderr:
    """Writes access lines to stderr in batches: at most FLUSH_SECONDS late, FLUSH_LINES at once.

    grpc.aio completes about one RPC per event-loop turn, so writing per line (or per
    turn) costs one system call per RPC, which measured as the largest single cost of the
    access log. Like nginx's ``access_log ... buffer= flush=``, lines wait a little and go
    out together; the chain flushes what is left when the server stops. A crash can lose
    at most the last FLUSH_SECONDS of access lines (errors are logged unbuffered).
    """

    FLUSH_LINES: Final = 256
    FLUSH_SECONDS: Final = 0.05

    def __init__(self) -> None:
        """Start with nothing pending."""
        self._pending: list[str] = []

    def __call__(self, line: str) -> None:
        """Queue line; the first line of a batch schedules its flush."""
        if not self._pending:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            except RuntimeError:
                sys.stderr.write(line)
                return
        self._pending.append(line)
        if len(self._pending) >= self.FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        """Write every pending line now."""
        if self._pending:
            lines, self._pending = self._pending, []
            try:
                # Looked up per write so a replaced sys.stderr (tests, daemons) is honoured.
                sys.stderr.write("".join(lines))
                sys.stderr.flush()
            except Exception:
                ACCESS_LOG_ERRORS.inc(len(lines))
