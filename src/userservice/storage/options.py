"""How a store is opened: one small value the wiring builds from the service's settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Everything either backend needs to open, migrate and run a store."""

    migrate_on_start: bool
    event_retention: int
    request_id_retention_seconds: float
    statement_timeout_seconds: float
    sqlite_synchronous: str
    """SQLite: PRAGMA synchronous, NORMAL or FULL."""
    connect_timeout_seconds: float
    """PostgreSQL: connect timeout."""
    migration_lock_timeout_seconds: float
    """PostgreSQL: how long a migration waits for a table lock."""
    pool_min_size: int
    pool_max_size: int
