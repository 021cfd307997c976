-- The identity-provider subject (a bearer token's sub) each user belongs to: who may change
-- the user with only users.write. NULL for no one: users that existed before this migration,
-- and users an admin created without one. The partial unique index gives a subject at most
-- one user and leaves NULLs out (SQLite would also let them repeat in a plain one).
ALTER TABLE users ADD COLUMN subject TEXT;
CREATE UNIQUE INDEX users_subject_key ON users (subject) WHERE subject IS NOT NULL;
-- The same field in the snapshots the change log and the idempotency records keep.
ALTER TABLE user_events ADD COLUMN subject TEXT;
ALTER TABLE create_requests ADD COLUMN subject TEXT;
