"""The migration rules both stores follow: file names, checksums, order, the no-transaction marker.

A backend's migrations are the files of its `sql/` folder, each named `NNNN_name.sql`. This
module decides what is pending and whether the recorded history still matches the files;
each backend only runs the statements and records them (sqlite3 and asyncpg share no
driver API, and no migration library drives both: see docs/adr/0002-own-migration-runner.md).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final

MIGRATION_FILE: Final = re.compile(r"(?P<version>\d{4})_[a-z0-9]+(?:_[a-z0-9]+)*\.sql")
NO_TRANSACTION_MARKER: Final = "-- migrate: no-transaction"


class MigrationError(RuntimeError):
    """A migration file or the recorded schema history is not what this code expects."""


class SchemaNotReadyError(MigrationError):
    """The database lacks migrations this code needs; run `userservice migrate`."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change read from a backend's sql/ folder."""

    version: int
    name: str
    sql: str
    checksum: str
    transactional: bool = True

    @classmethod
    def from_text(cls, version: int, name: str, sql: str) -> Migration:
        """Build a migration from its text: the checksum and the marker follow from it."""
        return cls(
            version,
            name,
            sql,
            hashlib.sha256(sql.encode()).hexdigest(),
            transactional=not _has_no_transaction_marker(sql),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run must do: migrations to apply, and applied ones whose checksum to record."""

    pending: list[Migration]
    unrecorded: list[Migration]


def backend_migrations(backend: str) -> list[Migration]:
    """Return the migrations packaged for a backend ("sqlite" or "postgres"), in order."""
    return load_migrations(resources.files(f"userservice.storage.{backend}").joinpath("sql"))


def load_migrations(folder: Traversable) -> list[Migration]:
    """Read every file of folder as a migration; any file not named NNNN_name.sql is an error."""
    found: dict[int, Migration] = {}
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        match = MIGRATION_FILE.fullmatch(entry.name)
        if match is None or not entry.is_file():
            raise MigrationError(
                f"migration file {entry.name!r} in {folder} is not named NNNN_name.sql "
                "(four digits, an underscore, lower-case words joined by underscores)"
            )
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"migrations {found[version].name!r} and {entry.name!r} share version {version}"
            )
        text = entry.read_text(encoding="utf-8")
        found[version] = Migration.from_text(version, entry.name.removesuffix(".sql"), text)
    return [found[version] for version in sorted(found)]


def plan(migrations: Iterable[Migration], applied: Mapping[int, str | None]) -> Plan:
    """Compare the files with the recorded versions and checksums (None: not recorded yet).

    Raises MigrationError when an applied file was edited or a new file sorts below an
    applied one. Recorded versions with no file (a rollback to older code) are allowed.
    """
    pending: list[Migration] = []
    unrecorded: list[Migration] = []
    newest_applied = max(applied, default=0)
    for migration in migrations:
        if migration.version not in applied:
            if migration.version < newest_applied:
                raise MigrationError(
                    f"migration {migration.name} is not applied but sorts below applied "
                    f"version {newest_applied}; renumber it above {newest_applied:04d}"
                )
            pending.append(migration)
            continue
        recorded = applied[migration.version]
        if recorded is None:
            unrecorded.append(migration)
        elif recorded != migration.checksum:
            raise MigrationError(
                f"migration {migration.name} was edited after it was applied (recorded sha256 "
                f"{recorded[:12]}, file {migration.checksum[:12]}); restore the applied file "
                "and put the change in a new migration"
            )
    return Plan(pending, unrecorded)


def require_ready(migrations: Iterable[Migration], applied: Mapping[int, str | None]) -> None:
    """Raise SchemaNotReadyError if a migration is pending, MigrationError if one was edited."""
    pending = plan(migrations, applied).pending
    if pending:
        names = [migration.name for migration in pending]
        raise SchemaNotReadyError(
            f"the schema lacks migrations {names}; run `userservice migrate` "
            "or enable USERSERVICE_MIGRATE_ON_START"
        )


def split_statements(sql: str) -> list[str]:
    """Split a no-transaction migration into statements, one per `;` that ends a line.

    Such files are run statement by statement outside any transaction (PostgreSQL refuses
    CREATE INDEX CONCURRENTLY inside one, and a multi-statement query is one), so they
    must not use a `;` at a line's end inside a literal or a function body.
    """
    statements: list[str] = []
    pending: list[str] = []
    for line in sql.splitlines():
        pending.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(pending).strip())
            pending = []
    rest = "\n".join(line for line in pending if not line.strip().startswith("--")).strip()
    if rest:
        statements.append(rest)
    return [statement for statement in statements if _has_code(statement)]


def _has_code(statement: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in statement.split("\n"))


def _has_no_transaction_marker(sql: str) -> bool:
    for line in sql.splitlines():
        stripped = line.strip()
        if stripped.lower() == NO_TRANSACTION_MARKER:
            return True
        if stripped and not stripped.startswith("--"):
            # The marker belongs in the header comment, before the first statement.
            return False
    return False
