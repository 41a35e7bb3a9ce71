-- depends: 0003.finite-instants
-- Each run of a worker process is one incarnation: a second process started with a WORKER_ID
-- that is still live is refused instead of fighting the first over its leases.
ALTER TABLE workers ADD COLUMN incarnation uuid;

-- Settings every API and worker process must agree on, recorded by the first one to start.
-- PARTITIONS decides which queue each event's purchases go to: two values at once would split
-- one event over two queues and two writers.
CREATE TABLE cluster_config (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions  integer     NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
