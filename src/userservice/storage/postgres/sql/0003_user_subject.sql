-- The identity-provider subject (a bearer token's sub) each user belongs to: who may change
-- the user with only users.write. NULL for no one: users that existed before this migration,
-- and users an admin created without one. The partial unique index gives a subject at most
-- one user and holds no entry for the NULLs. Adding a NULL column rewrites nothing; building
-- the index reads the table once under this migration's lock.
ALTER TABLE users ADD COLUMN subject text;
CREATE UNIQUE INDEX users_subject_key ON users (subject) WHERE subject IS NOT NULL;
-- The same field in the snapshots the change log and the idempotency records keep.
ALTER TABLE user_events ADD COLUMN subject text;
ALTER TABLE create_requests ADD COLUMN subject text;
