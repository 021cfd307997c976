-- A delete erases the user's personal data from its earlier events and idempotency records
-- in the same transaction (storage writes); these indexes find those rows without a scan.
CREATE INDEX user_events_user_id_idx ON user_events (user_id);
CREATE INDEX create_requests_user_id_idx ON create_requests (user_id);

-- Users deleted before this migration: their rows get the erased form now ('' is the
-- domain's model.ERASED; a deleted user is one whose id is no longer in users).
UPDATE user_events SET email = '', display_name = '', subject = NULL
WHERE user_id NOT IN (SELECT id FROM users);
UPDATE create_requests SET email = '', display_name = '', fingerprint = '', subject = NULL
WHERE user_id NOT IN (SELECT id FROM users);
