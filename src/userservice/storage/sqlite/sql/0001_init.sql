-- Users, the change log WatchUsers reads, and CreateUser idempotency keys.
-- Times are integer microseconds since the Unix epoch, as in the PostgreSQL schema.

-- WITHOUT ROWID: the text primary key is the only b-tree, so a lookup by id is one search.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    -- Lower-cased by the repository; the unique index is what keeps emails
    -- unique without regard to case, also under concurrent writes.
    email_normalized TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    role INTEGER NOT NULL CHECK (role BETWEEN 1 AND 3),
    create_time_us INTEGER NOT NULL,
    update_time_us INTEGER NOT NULL,
    revision INTEGER NOT NULL
) WITHOUT ROWID;

-- Serves "role = ?" filters in keyset (id) order without a sort.
CREATE INDEX users_role_id_idx ON users (role, id);

-- AUTOINCREMENT never hands out a sequence twice, whatever gets deleted, and its
-- counter rolls back with a failed write, so sequences stay contiguous.
CREATE TABLE user_events (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    type INTEGER NOT NULL CHECK (type BETWEEN 1 AND 3),
    user_id TEXT NOT NULL,
    email TEXT NOT NULL,
    display_name TEXT NOT NULL,
    role INTEGER NOT NULL,
    create_time_us INTEGER NOT NULL,
    update_time_us INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    event_time_us INTEGER NOT NULL
);

CREATE TABLE create_requests (
    request_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    user_id TEXT NOT NULL,
    email TEXT NOT NULL,
    display_name TEXT NOT NULL,
    role INTEGER NOT NULL,
    create_time_us INTEGER NOT NULL,
    update_time_us INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    created_us INTEGER NOT NULL
) WITHOUT ROWID;

-- Lets an operator (or a later migration) expire old idempotency keys by age.
CREATE INDEX create_requests_created_us_idx ON create_requests (created_us);
