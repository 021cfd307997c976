-- The two PostgreSQL roles of a production deployment (README "Deploy").
--
-- userservice_migrator owns the schema: the migrate Job connects as it (secret key
-- migrate-database-url) and runs the migrations' DDL. userservice_app is what the server's
-- pods connect as (secret key database-url): it reads and writes rows and can change nothing
-- else, so a compromised pod or an injected statement cannot drop, alter or add tables.
--
-- Run once, as a superuser or your managed service's admin role, connected to the service's
-- (new, empty) database, then give both roles passwords:
--   psql "postgresql://ADMIN@HOST:5432/userservice" -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
--   psql ... -c "ALTER ROLE userservice_migrator PASSWORD '...'"   (and userservice_app)
-- tests/system/test_deploy_start.py runs this file (with its own role names) before it migrates as
-- the migrator and serves as the application role.

CREATE ROLE userservice_migrator LOGIN;
CREATE ROLE userservice_app LOGIN;

-- Only the migrator creates objects in the schema (before PostgreSQL 15 every role could).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO userservice_migrator;
GRANT USAGE ON SCHEMA public TO userservice_app;

-- Every table and sequence the migrator creates, in this release's migrations and in every
-- later one, is granted to the application as it is created: rows only (no TRUNCATE, no
-- REFERENCES, no TRIGGER), and sequences for nextval. No migration has to remember a GRANT.
ALTER DEFAULT PRIVILEGES FOR ROLE userservice_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO userservice_app;
ALTER DEFAULT PRIVILEGES FOR ROLE userservice_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO userservice_app;
