"""The embedded SQLite store: one file, one process, exact read cache, in-process change feed."""

from userservice.storage.sqlite.connection import SqliteLockedError
from userservice.storage.sqlite.migrations import migrate_sqlite
from userservice.storage.sqlite.repository import SqliteUserRepository, open_sqlite

__all__ = ["SqliteLockedError", "SqliteUserRepository", "migrate_sqlite", "open_sqlite"]
