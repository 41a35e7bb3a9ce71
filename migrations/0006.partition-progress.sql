-- depends: 0005.box-office
-- How far each partition's worker has decided, for the wait ahead of a pending purchase
-- (README, "The wait ahead"). Written by the partition's owner in each commit's transaction.

CREATE TABLE partition_progress (
    partition   integer PRIMARY KEY CHECK (partition >= 0),
    -- Everything the API accepted before this instant is decided: the newest acceptance time
    -- among the commands applied, or, with the queue found drained, the commit's time less the
    -- delivery margin.
    horizon     timestamptz NOT NULL CHECK (isfinite(horizon)),
    recorded_at timestamptz NOT NULL CHECK (isfinite(recorded_at)),
    -- Seconds of accepted time decided per second of wall time, smoothed over about five
    -- seconds: 1 while the worker keeps up, less while a backlog is worked through.
    rate        double precision CHECK (rate >= 0)
);
