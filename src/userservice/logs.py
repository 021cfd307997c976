"""Structured JSON logging to stderr: one object per line, for people and log shippers alike."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

_GRPC_LOGGER: Final = "grpc._cython.cygrpc"
_GRPC_BAD_METADATA: Final = "Invalid encoding on %s"
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line; extra={...} fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the JSON line for one record, stack trace included when there is one."""
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class _BadMetadataFilter(logging.Filter):
    """Turns grpc's ERROR-with-traceback for a metadata value that is not UTF-8 into a WARNING.

    grpc logs that record, value included, each time it decodes such a value (twice per
    call): a client could flood the log with tracebacks at will, and the value may be a
    credential. The rewritten record names neither the value nor a stack.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _GRPC_BAD_METADATA:
            record.msg = "a request metadata value is not valid UTF-8 (read as Latin-1)"
            record.args = ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_BAD_METADATA_FILTER: Final = _BadMetadataFilter()


class _ReconnectFilter(logging.Filter):
    """Turns asyncpg's reconnect-attempt WARNING with a traceback into one line naming the error.

    While the database is down the pool logs each attempt to restore its floor (1 s back-off,
    doubling to 60 s), and a stack of asyncpg's connect internals says nothing the error's
    class and message do not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _ASYNCPG_RECONNECT and record.exc_info and record.exc_info[1]:
            error = record.exc_info[1]
            record.error = f"{type(error).__name__}: {error}"
            record.exc_info = record.exc_text = None
        return True


_ASYNCPG_POOL_LOGGER: Final = "asyncpg.pool"
_ASYNCPG_RECONNECT: Final = "Failed to restore the pool connection floor; retrying"
_RECONNECT_FILTER: Final = _ReconnectFilter()


def quiet_library_logs() -> None:
    """Install the two filters above on grpc's and asyncpg's loggers (idempotent)."""
    logging.getLogger(_GRPC_LOGGER).addFilter(_BAD_METADATA_FILTER)
    logging.getLogger(_ASYNCPG_POOL_LOGGER).addFilter(_RECONNECT_FILTER)


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON at the given level."""
    quiet_library_logs()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
