"""The production PostgreSQL store: many replicas on one database, LISTEN/NOTIFY change feed."""

from userservice.storage.postgres.migrations import SchemaNotReadyError, migrate_postgres
from userservice.storage.postgres.opening import open_postgres
from userservice.storage.postgres.repository import PostgresUserRepository

__all__ = ["PostgresUserRepository", "SchemaNotReadyError", "migrate_postgres", "open_postgres"]
