-- depends: 0001.events-and-purchases
-- Worker membership and partition leases (see README, "Partitions and leases").

CREATE TABLE workers (
    worker_id    text        PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

CREATE TABLE partition_leases (
    partition  integer     PRIMARY KEY CHECK (partition >= 0),
    owner      text,
    -- Raised on every change of owner; a commit checks it (fencing), so a worker whose lease
    -- was taken over can never commit again.
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
