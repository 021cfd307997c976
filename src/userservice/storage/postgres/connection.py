"""PostgreSQL connections: options, acquiring from the pool, and what a driver error means."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import asyncpg

from userservice.domain.deadlines import time_remaining
from userservice.domain.errors import (
    StorageBusyError,
    StorageTimeoutError,
    StorageUnavailableError,
)

# Everything that means "the database cannot be reached or cannot serve right now";
# callers see StorageUnavailableError (gRPC UNAVAILABLE) and may retry.
UNAVAILABLE_ERRORS: Final = (
    OSError,  # refused, reset, unreachable, DNS; TimeoutError is an OSError too
    asyncpg.InterfaceError,  # connection closed or pool closing (see acquire)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # connected to a standby during failover
)
# Time kept back from the caller's deadline to send the answer.
_ANSWER_MARGIN_SECONDS: Final = 0.05


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Timeouts every connection of this store is opened with."""

    connect_timeout: float
    statement_timeout: float

    def connect_kwargs(self, application_name: str) -> dict[str, Any]:
        """Return asyncpg.connect / create_pool keyword arguments."""
        statement_ms = str(max(1, round(self.statement_timeout * 1000)))
        return {
            "timeout": self.connect_timeout,
            # The server stops runaway statements; the client-side limit is a
            # little longer so it only fires when the server cannot answer at all.
            "command_timeout": self.statement_timeout + 1.0,
            "server_settings": {
                "application_name": application_name,
                "statement_timeout": statement_ms,
                # A client that stalls inside a transaction would otherwise hold
                # the event counter's row lock and stop every writer.
                "idle_in_transaction_session_timeout": statement_ms,
            },
        }


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, timeout: float) -> AsyncIterator[asyncpg.Connection]:
    """Lend a pool connection for the body, translating driver failures to domain errors.

    The timeout covers waiting for a free connection and reconnecting a dead one; the pool
    takes the connection back even when the caller is cancelled.
    """
    remaining = time_remaining()
    if remaining is not None:
        # Answer before the caller's deadline: STORAGE_BUSY tells it why, a deadline
        # expiring in the pool queue would not.
        timeout = max(0.001, min(timeout, remaining - _ANSWER_MARGIN_SECONDS))
    acquired = False
    try:
        async with pool.acquire(timeout=timeout) as conn:
            acquired = True
            with translated_errors(conn):
                yield conn
    except UNAVAILABLE_ERRORS as error:
        if not acquired and isinstance(error, TimeoutError) and _exhausted(pool):
            # Every connection was lent out the whole time: overload, not an outage.
            raise StorageBusyError() from error
        # Clients see the generic message; the cause stays chained for the logs.
        raise StorageUnavailableError() from error


def _exhausted(pool: asyncpg.Pool) -> bool:
    return bool(pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size())


@contextlib.contextmanager
def translated_errors(conn: asyncpg.Connection) -> Iterator[None]:
    """Map a statement's driver failure to the domain error that tells the truth about it."""
    try:
        yield
    except asyncpg.exceptions.QueryCanceledError as error:
        # SQLSTATE 57014: statement_timeout (or an operator's cancel). Retrying would run
        # the same expensive statement again, so it is not reported as unavailable.
        raise StorageTimeoutError() from error
    except asyncpg.InterfaceError as error:
        # On a live connection an InterfaceError is a bug (bad arguments, a concurrent
        # use), which must surface rather than pass for an outage.
        if not conn.is_closed():
            raise RuntimeError(f"asyncpg refused the call: {error}") from error
        raise StorageUnavailableError() from error
    except UNAVAILABLE_ERRORS as error:
        raise StorageUnavailableError() from error


async def close_connection(conn: asyncpg.Connection, timeout: float) -> None:
    """Close conn politely within timeout, else terminate it."""
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=timeout)
    except (TimeoutError, *UNAVAILABLE_ERRORS):
        conn.terminate()
