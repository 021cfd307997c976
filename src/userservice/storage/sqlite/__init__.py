"""The embedded SQLite store: one file, one process, exact read cache, in-process change feed."""

from userservice.storage.sqlite.connection import SqliteLockedError
from userservice.storage.sqlite.migrations import migrate_sqlite
from userservice.storage.sqlite.opening import open_sqlite
from userservice.storage.sqlite.repository import SqliteUserRepository

__all__ = ["SqliteLockedError", "SqliteUserRepository", "migrate_sqlite", "open_sqlite"]
