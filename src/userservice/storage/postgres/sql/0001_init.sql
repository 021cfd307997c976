-- Users, the change log WatchUsers reads, and CreateUser idempotency keys.
-- Times are integer microseconds since the Unix epoch, as in the SQLite schema.

CREATE TABLE users (
    -- UUIDv7 strings; byte order ("C") keeps keyset pagination in insert order
    -- whatever the database's default collation is.
    id text COLLATE "C" PRIMARY KEY,
    email text NOT NULL,
    email_normalized text NOT NULL,
    display_name text NOT NULL,
    role smallint NOT NULL CHECK (role BETWEEN 1 AND 3),
    create_time_us bigint NOT NULL,
    update_time_us bigint NOT NULL,
    revision bigint NOT NULL
);

-- The database, not a read-then-write check, keeps emails unique across replicas.
CREATE UNIQUE INDEX users_email_normalized_key ON users (email_normalized);

CREATE TABLE user_events (
    sequence bigint PRIMARY KEY,
    type smallint NOT NULL CHECK (type BETWEEN 1 AND 3),
    user_id text COLLATE "C" NOT NULL,
    email text NOT NULL,
    display_name text NOT NULL,
    role smallint NOT NULL,
    create_time_us bigint NOT NULL,
    update_time_us bigint NOT NULL,
    revision bigint NOT NULL,
    event_time_us bigint NOT NULL
);

-- One row. Writers take its row lock as the last statement of their transaction
-- and hold it until commit, so sequences commit (become visible) in order; a
-- sequence object would hand out numbers that can commit out of order.
CREATE TABLE event_sequence (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    value bigint NOT NULL
);
INSERT INTO event_sequence (singleton, value) VALUES (true, 0);

CREATE TABLE create_requests (
    request_id text PRIMARY KEY,
    fingerprint text NOT NULL,
    user_id text COLLATE "C" NOT NULL,
    email text NOT NULL,
    display_name text NOT NULL,
    role smallint NOT NULL,
    create_time_us bigint NOT NULL,
    update_time_us bigint NOT NULL,
    revision bigint NOT NULL,
    created_us bigint NOT NULL
);

-- Lets an operator (or a later migration) expire old idempotency keys by age.
CREATE INDEX create_requests_created_us_idx ON create_requests (created_us);
