-- depends: 0002.partition-leases
-- Backstops for the API's instant bounds: asyncpg writes datetime.min/max (in UTC) as -infinity
-- and infinity, which it then reads back as naive datetimes. No such value may ever be stored.
-- NOT VALID first, then VALIDATE: new writes are checked at once, and existing rows are checked
-- without holding the table's exclusive lock for the scan. A row that fails VALIDATE was
-- corrupted by that bug and must be corrected by hand before this migration can apply.

ALTER TABLE events
    ADD CONSTRAINT events_instants_finite
    CHECK (isfinite(starts_at) AND isfinite(created_at) AND isfinite(updated_at)) NOT VALID;
ALTER TABLE events VALIDATE CONSTRAINT events_instants_finite;

ALTER TABLE purchases
    ADD CONSTRAINT purchases_instants_finite
    CHECK (isfinite(accepted_at) AND isfinite(processed_at)) NOT VALID;
ALTER TABLE purchases VALIDATE CONSTRAINT purchases_instants_finite;
