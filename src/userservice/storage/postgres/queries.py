"""Every SQL text the PostgreSQL store runs, apart from the migrations in sql/."""

from __future__ import annotations

from typing import Final

from userservice.storage.rows import (
    INSERT_COLUMNS,
    INSERT_TYPES,
    PERSONAL_DATA,
    SNAPSHOT_COLUMNS,
    USER_COLUMNS,
    USER_DATA_TYPES,
    assignments,
    placeholders,
)

# Column lists come from storage/rows.py (hence the S608 waivers): a user column is named
# there once, and each text is built once, at import. Every value is a bound parameter.


def _arrays(types: tuple[tuple[str, str], ...], first: int) -> str:
    """Return `$2::text[], $3::bigint[]`: one typed array parameter per column, for unnest."""
    return ", ".join(f"${first + index}::{kind}[]" for index, (_, kind) in enumerate(types))


SELECT_USER: Final = f"""
SELECT {USER_COLUMNS}
FROM users WHERE id = $1
"""  # noqa: S608

SELECT_USERS: Final = f"""
SELECT {USER_COLUMNS}
FROM users WHERE id = ANY($1::text[])
"""  # noqa: S608

SELECT_USER_BY_EMAIL: Final = f"""
SELECT {USER_COLUMNS}
FROM users WHERE email_normalized = $1
"""  # noqa: S608

LOCK_USER: Final = f"""
SELECT {USER_COLUMNS}
FROM users WHERE id = $1 FOR UPDATE
"""  # noqa: S608

# The subjects among $1 that already have a user, with the email of that user.
SELECT_SUBJECT_OWNERS: Final = """
SELECT subject, email_normalized FROM users WHERE subject = ANY($1::text[])
"""

LOCK_USER_BY_EMAIL: Final = f"""
SELECT {USER_COLUMNS}
FROM users WHERE email_normalized = $1 FOR UPDATE
"""  # noqa: S608


INSERT_USER: Final = f"""
INSERT INTO users ({INSERT_COLUMNS})
VALUES ({placeholders(INSERT_COLUMNS, "$")})
"""  # noqa: S608

UPSERT_INSERT: Final = f"""
INSERT INTO users ({INSERT_COLUMNS})
VALUES ({placeholders(INSERT_COLUMNS, "$")})
ON CONFLICT (email_normalized) DO NOTHING
RETURNING id
"""  # noqa: S608

# One typed array per INSERT_COLUMNS column, $1 onwards.
INSERT_MANY: Final = f"""
INSERT INTO users ({INSERT_COLUMNS})
SELECT * FROM unnest({_arrays(INSERT_TYPES, 1)})
ON CONFLICT DO NOTHING
RETURNING id
"""  # noqa: S608

# Claims a new key, or takes over an expired one ($1 is the cutoff) in place. On a
# conflict DO UPDATE waits for the row's writer, then locks the row's newest version
# and tests the WHERE on it even when it declines to update; so of replicas racing on
# one expired key exactly one takes it over, and the rest find a live row they hold
# locked, which no sweep can delete before they read it.
_REQUEST_COLUMNS: Final = ("request_id", "fingerprint", "created_us", *SNAPSHOT_COLUMNS.split(", "))
CLAIM_REQUEST: Final = f"""
INSERT INTO create_requests ({", ".join(_REQUEST_COLUMNS)})
VALUES ({placeholders(", ".join(_REQUEST_COLUMNS), "$", 2)})
ON CONFLICT (request_id) DO UPDATE
SET {", ".join(f"{name} = EXCLUDED.{name}" for name in _REQUEST_COLUMNS[1:])}
WHERE create_requests.created_us < $1
RETURNING request_id
"""  # noqa: S608

SELECT_REQUEST: Final = f"""
SELECT {SNAPSHOT_COLUMNS}, fingerprint
FROM create_requests WHERE request_id = $1
"""  # noqa: S608

# A delete's erasure of the user's earlier events and idempotency records: $2 onwards are the
# erased user's PERSONAL_DATA (then the erased fingerprint); the user_id indexes of migration
# 0004 find the rows.
ERASE_EVENTS: Final = f"""
UPDATE user_events SET {assignments(PERSONAL_DATA, "$", 2)} WHERE user_id = $1
"""  # noqa: S608
ERASE_REQUESTS: Final = f"""
UPDATE create_requests SET {assignments((*PERSONAL_DATA, "fingerprint"), "$", 2)}
WHERE user_id = $1
"""  # noqa: S608

# Every column but the id, from insert_fields() ($1 is the id); create_time_us is rewritten
# with the value it has.
UPDATE_USER: Final = f"""
UPDATE users SET {assignments([name for name, _ in INSERT_TYPES[1:]], "$", 2)}
WHERE id = $1
"""  # noqa: S608

# Keyset batches of rows lacking their display_name_key (written before migration 0002, or
# by a replica still running older code); the update re-checks the name the key was
# computed from, and that no write has set the key since.
SELECT_UNKEYED: Final = """
SELECT id, display_name FROM users
WHERE id > $1 AND display_name_key IS NULL ORDER BY id LIMIT $2
"""
SET_KEYS: Final = """
UPDATE users AS u SET display_name_key = k.key
FROM unnest($1::text[], $2::text[], $3::text[]) AS k(key, id, name)
WHERE u.id = k.id AND u.display_name = k.name AND u.display_name_key IS NULL
"""

# One statement, issued last so the counter's row lock (which orders commits)
# is held only for this statement and the COMMIT. It allocates a block of
# sequences, appends the events, drops the events that fall out of retention
# and queues the NOTIFY, all in the writer's transaction. Retention deletes the
# range this block pushes out, plus a small slack that catches rows a
# concurrent writer committed after this statement's snapshot was taken;
# a bounded range keeps the scan off the dead index entries of earlier prunes.
# $1 is the retention, then one typed array per event column.
_EVENT_TYPES: Final = (
    ("type", "smallint"),
    ("event_time_us", "bigint"),
    ("user_id", "text"),
    *USER_DATA_TYPES,
)
_EVENT_COLUMNS: Final = ", ".join(name for name, _ in _EVENT_TYPES)
APPEND_EVENTS: Final = f"""
WITH allocated AS (
    UPDATE event_sequence SET value = value + cardinality($2::smallint[])
    RETURNING value AS last, value - cardinality($2::smallint[]) AS previous
),
inserted AS (
    INSERT INTO user_events (sequence, {_EVENT_COLUMNS})
    SELECT a.previous + e.ord, {", ".join(f"e.{name}" for name, _ in _EVENT_TYPES)}
    FROM allocated AS a,
         unnest({_arrays(_EVENT_TYPES, 2)}) WITH ORDINALITY AS e({_EVENT_COLUMNS}, ord)
    WHERE a.previous + e.ord > a.last - $1::bigint
),
pruned AS (
    DELETE FROM user_events
    WHERE sequence > (SELECT previous FROM allocated) - $1::bigint - 64
      AND sequence <= (SELECT last FROM allocated) - $1::bigint
)
SELECT last, pg_notify('user_events', last::text) FROM allocated
"""  # noqa: S608

# Deletes the oldest events beyond retention, at most $2 + 1 of them, from the
# bottom up so that what remains is always a contiguous run of sequences.
PRUNE_BATCH: Final = """
DELETE FROM user_events
WHERE sequence <= LEAST((SELECT min(sequence) FROM user_events) + $2::bigint,
                        (SELECT value FROM event_sequence) - $1::bigint)
"""
PRUNE_BATCH_SIZE: Final = 10_000

# The oldest keys expired before $1, at most $2, off the created_us index. SKIP LOCKED
# passes over a key a create is taking over (or another replica's sweep holds), and the
# locking read re-tests created_us on a row changed since the snapshot, so a key claimed
# anew is never deleted.
EXPIRE_REQUESTS: Final = """
DELETE FROM create_requests
WHERE request_id = ANY(ARRAY(
    SELECT request_id FROM create_requests
    WHERE created_us < $1
    ORDER BY created_us
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
"""

SELECT_EVENTS: Final = f"""
SELECT {SNAPSHOT_COLUMNS}, sequence, type, event_time_us
FROM user_events WHERE sequence > $1 ORDER BY sequence LIMIT $2
"""  # noqa: S608

DELETE_USER: Final = "DELETE FROM users WHERE id = $1"
SELECT_LATEST_SEQUENCE: Final = "SELECT value FROM event_sequence"
EVENT_BOUNDS: Final = "SELECT min(sequence), max(sequence) FROM user_events"
PING: Final = "SELECT 1"

CREATE_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum text
)
"""
ADD_CHECKSUM_COLUMN: Final = "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text"
SELECT_APPLIED: Final = "SELECT version, checksum FROM schema_migrations"
RECORD_MIGRATION: Final = (
    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
)
RECORD_CHECKSUM: Final = "UPDATE schema_migrations SET checksum = $1 WHERE version = $2"
