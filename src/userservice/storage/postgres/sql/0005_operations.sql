-- Long-running operations (google.longrunning.Operations). Any replica answers for one; the
-- replica running it holds a lease (lease_owner until lease_expiry_us) it renews with every
-- batch, and a replica that finds the lease expired takes the operation over.
-- request, metadata, result and error are the domain's JSON documents for the operation's kind.
CREATE TABLE operations (
    -- "operations/" and a UUIDv7: byte order ("C") lists them in creation order.
    name text COLLATE "C" PRIMARY KEY,
    kind text NOT NULL,
    -- The principal (token subject) that started it: with users.admin, the only one who sees it.
    owner text NOT NULL,
    request text NOT NULL,
    metadata text NOT NULL,
    done boolean NOT NULL DEFAULT false,
    result text,
    error text,
    cancel_requested boolean NOT NULL DEFAULT false,
    lease_owner text NOT NULL,
    lease_expiry_us bigint NOT NULL,
    create_time_us bigint NOT NULL,
    update_time_us bigint NOT NULL
);

-- What a sweep looks for: unfinished operations whose lease ran out.
CREATE INDEX operations_lease_idx ON operations (lease_expiry_us) WHERE NOT done;
CREATE INDEX operations_owner_idx ON operations (owner, name);
