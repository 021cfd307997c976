"""The one error start-up reports to the process: a line for the log, exit code 1."""

from __future__ import annotations


class StartupError(RuntimeError):
    """The server could not start (port taken, database unreachable or locked, schema not ready)."""
