-- Long-running operations (google.longrunning.Operations); see the PostgreSQL migration of the
-- same number. A SQLite store serves one process, so a lease here matters across restarts:
-- the next process resumes what the last one left.
-- request, metadata, result and error are the domain's JSON documents for the operation's kind.
CREATE TABLE operations (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    request TEXT NOT NULL,
    metadata TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT NOT NULL,
    lease_expiry_us INTEGER NOT NULL,
    create_time_us INTEGER NOT NULL,
    update_time_us INTEGER NOT NULL
);

CREATE INDEX operations_lease_idx ON operations (lease_expiry_us) WHERE NOT done;
CREATE INDEX operations_owner_idx ON operations (owner, name);
