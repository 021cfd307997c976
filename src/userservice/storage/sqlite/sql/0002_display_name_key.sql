-- The display name in the form display_name filters match against: search_key() of the
-- domain (Unicode case folding and NFKC), written by the repository with every insert and
-- update. SQL cannot compute it, so rows from before this migration keep NULL here until
-- the store's open fills them in (storage/rows.py BACKFILL_BATCH rows per transaction).
ALTER TABLE users ADD COLUMN display_name_key TEXT;
