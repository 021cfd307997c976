"""Every SQL text the SQLite store runs, apart from the migrations in sql/."""

from __future__ import annotations

from typing import Final

from userservice.storage.rows import (
    INSERT_COLUMNS,
    INSERT_TYPES,
    PERSONAL_DATA,
    SNAPSHOT_COLUMNS,
    USER_COLUMNS,
    assignments,
    placeholders,
)

# Assembled once, at import, only from the constant column lists of storage/rows.py (hence
# the S608 waivers); every value is a bound parameter. ?N marks number the parameters where a
# statement binds the same values as another in another order.
SELECT_USER: Final = f"SELECT {USER_COLUMNS} FROM users WHERE id = ?"  # noqa: S608
SELECT_USER_BY_EMAIL: Final = f"SELECT {USER_COLUMNS} FROM users WHERE email_normalized = ?"  # noqa: S608
# json_each binds any number of ids as one parameter, so the statement text never varies.
SELECT_USERS: Final = (
    f"SELECT {USER_COLUMNS} FROM users WHERE id IN (SELECT value FROM json_each(?))"  # noqa: S608
)
# The emails among a batch's keys (a JSON array) that are already taken.
SELECT_TAKEN_EMAILS: Final = (
    "SELECT email_normalized FROM users WHERE email_normalized IN (SELECT value FROM json_each(?))"
)
# The subjects among a batch's (a JSON array) that already have a user.
SELECT_TAKEN_SUBJECTS: Final = (
    "SELECT subject FROM users WHERE subject IN (SELECT value FROM json_each(?))"
)
SELECT_PAGE: Final = f"SELECT {USER_COLUMNS} FROM users{{where}} ORDER BY id LIMIT ?"  # noqa: S608
COUNT_USERS: Final = "SELECT count(*) FROM users{where}"
INSERT_USER: Final = (
    f"INSERT INTO users ({INSERT_COLUMNS}) VALUES ({placeholders(INSERT_COLUMNS)})"  # noqa: S608
    " ON CONFLICT (email_normalized) DO NOTHING"
)
# Every column but the id, from insert_fields() (?1 is the id); create_time_us is rewritten
# with the value it has.
UPDATE_USER: Final = (
    f"UPDATE users SET {assignments([name for name, _ in INSERT_TYPES[1:]], '?', 2)}"  # noqa: S608
    " WHERE id = ?1"
)
# Keyset batches of rows lacking their display_name_key (written before migration 0002); the
# update re-checks the name it was computed from and that no write has set the key since.
SELECT_UNKEYED: Final = (
    "SELECT id, display_name FROM users WHERE id > ? AND display_name_key IS NULL"
    " ORDER BY id LIMIT ?"
)
SET_KEY: Final = (
    "UPDATE users SET display_name_key = ?"
    " WHERE id = ? AND display_name = ? AND display_name_key IS NULL"
)
DELETE_USER: Final = "DELETE FROM users WHERE id = ?"
INSERT_EVENT: Final = (
    f"INSERT INTO user_events (type, event_time_us, {SNAPSHOT_COLUMNS})"  # noqa: S608
    f" VALUES (?, ?, {placeholders(SNAPSHOT_COLUMNS)}) RETURNING sequence"
)
# A batch's events, by executemany (which returns no rows); the last sequence is then read.
INSERT_EVENTS: Final = (
    f"INSERT INTO user_events (type, event_time_us, {SNAPSHOT_COLUMNS})"  # noqa: S608
    f" VALUES (?, ?, {placeholders(SNAPSHOT_COLUMNS)})"
)
# A delete's erasure of the user's earlier events and idempotency records: ?2 onwards are the
# erased user's PERSONAL_DATA (then the erased fingerprint); the user_id indexes of migration
# 0004 find the rows.
ERASE_EVENTS: Final = (
    f"UPDATE user_events SET {assignments(PERSONAL_DATA, '?', 2)} WHERE user_id = ?1"  # noqa: S608
)
ERASE_REQUESTS: Final = (
    "UPDATE create_requests"  # noqa: S608
    f" SET {assignments((*PERSONAL_DATA, 'fingerprint'), '?', 2)} WHERE user_id = ?1"
)
LAST_SEQUENCE: Final = "SELECT last_insert_rowid()"
SELECT_EVENTS: Final = (
    f"SELECT {SNAPSHOT_COLUMNS}, sequence, type, event_time_us FROM user_events"  # noqa: S608
    " WHERE sequence > ? ORDER BY sequence LIMIT ?"
)
# Two subqueries, because SQLite answers a lone min() or max() from the index but scans for both.
EVENT_BOUNDS: Final = (
    "SELECT (SELECT min(sequence) FROM user_events), (SELECT max(sequence) FROM user_events)"
)
PRUNE_EVENTS: Final = (
    "DELETE FROM user_events WHERE sequence <= (SELECT max(sequence) FROM user_events) - ?"
)
# An expired key reads as unknown, whether or not the sweep has deleted its row yet.
SELECT_REQUEST: Final = (
    f"SELECT {SNAPSHOT_COLUMNS}, fingerprint FROM create_requests"  # noqa: S608
    " WHERE request_id = ? AND created_us >= ?"
)
# REPLACE can only ever meet an expired row: a live one was found by SELECT_REQUEST in the
# same transaction and answered the request instead.
INSERT_REQUEST: Final = (
    "INSERT OR REPLACE INTO create_requests"  # noqa: S608
    f" ({SNAPSHOT_COLUMNS}, request_id, fingerprint, created_us)"
    f" VALUES ({placeholders(SNAPSHOT_COLUMNS)}, ?, ?, ?)"
)
# SQLite has no DELETE ... LIMIT by default; the oldest keys come off the created_us index.
EXPIRE_REQUESTS: Final = (
    "DELETE FROM create_requests WHERE request_id IN (SELECT request_id FROM create_requests"
    " WHERE created_us < ? ORDER BY created_us LIMIT ?)"
)
PING: Final = "SELECT 1 FROM schema_migrations LIMIT 1"

CREATE_MIGRATIONS_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),"
    " checksum TEXT)"
)
HAS_MIGRATIONS_TABLE: Final = (
    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
)
MIGRATION_COLUMNS: Final = "SELECT name FROM pragma_table_info('schema_migrations')"
ADD_CHECKSUM_COLUMN: Final = "ALTER TABLE schema_migrations ADD COLUMN checksum TEXT"
SELECT_APPLIED: Final = "SELECT version, checksum FROM schema_migrations"
RECORD_MIGRATION: Final = "INSERT INTO schema_migrations (version, name, checksum) VALUES (?, ?, ?)"
RECORD_CHECKSUM: Final = "UPDATE schema_migrations SET checksum = ? WHERE version = ?"
