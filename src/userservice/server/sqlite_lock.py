"""What the parent of `--workers N` prepares for its workers' store, and holds for them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from userservice.config import Settings
from userservice.server.wiring import migrate
from userservice.storage import is_postgres_url, parse_sqlite_path
from userservice.storage.sqlite.connection import lock as sqlite_lock
from userservice.storage.sqlite.shared import SharedCommits


@dataclass(eq=False)
class WorkerStore:
    """The schema migrated once, and on SQLite the file's lock with the workers' shared state."""

    shared: SharedCommits | None
    lock_fd: int | None

    @classmethod
    def prepare(cls, settings: Settings) -> WorkerStore:
        """Migrate (if configured) and, on SQLite, take the file's lock; raise storage errors."""
        if settings.migrate_on_start:
            migrate(settings)
        if is_postgres_url(settings.database_url):
            return cls(None, None)
        # Held by the parent for all its workers: still one server group per file.
        lock_fd = sqlite_lock(parse_sqlite_path(settings.database_url))
        return cls(SharedCommits(), lock_fd)

    def release(self) -> None:
        """Release the SQLite lock, once every worker has exited."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
