-- depends: 0004.worker-identity-and-partition-count
-- The box-office lifecycle: sales windows, per-customer limits, holds while the buyer pays,
-- confirmation and cancellation (README, "The box-office lifecycle").

ALTER TABLE events
    ADD COLUMN sales_start_at           timestamptz,
    ADD COLUMN sales_end_at             timestamptz,
    ADD COLUMN max_tickets_per_customer integer CHECK (max_tickets_per_customer BETWEEN 1 AND 10000),
    -- The API takes 30..3600; the table allows shorter holds so that tests need not wait 30 s.
    ADD COLUMN hold_seconds             integer CHECK (hold_seconds BETWEEN 1 AND 3600),
    ADD CONSTRAINT events_sales_window_in_order
        CHECK (sales_start_at IS NULL OR sales_end_at IS NULL OR sales_start_at < sales_end_at),
    ADD CONSTRAINT events_sales_window_finite
        CHECK (isfinite(sales_start_at) AND isfinite(sales_end_at));

-- A purchase without a row is pending; held ones wait for their confirmation until
-- hold_expires_at, and both held and confirmed ones hold tickets.
ALTER TABLE purchases
    DROP CONSTRAINT purchases_status_check,
    ADD CONSTRAINT purchases_status_check
        CHECK (status IN ('held', 'confirmed', 'rejected', 'expired', 'cancelled', 'failed')),
    DROP CONSTRAINT purchases_confirmed_is_complete,
    ADD CONSTRAINT purchases_holding_is_complete
        CHECK (status NOT IN ('held', 'confirmed', 'expired', 'cancelled')
               OR (event_id IS NOT NULL AND quantity IS NOT NULL AND customer_id IS NOT NULL)),
    ADD COLUMN hold_expires_at   timestamptz,
    ADD COLUMN confirmed_at      timestamptz,
    ADD COLUMN cancelled_at      timestamptz,
    ADD COLUMN payment_reference text CHECK (char_length(payment_reference) BETWEEN 1 AND 200),
    ADD CONSTRAINT purchases_held_until CHECK (status <> 'held' OR hold_expires_at IS NOT NULL),
    ADD CONSTRAINT purchases_lifecycle_finite
        CHECK (isfinite(hold_expires_at) AND isfinite(confirmed_at) AND isfinite(cancelled_at));

-- The partition's owner finds the holds that are due, and what a customer holds of an event.
CREATE INDEX purchases_held_by_partition ON purchases (partition, hold_expires_at)
    WHERE status = 'held';
CREATE INDEX purchases_holdings ON purchases (event_id, customer_id)
    WHERE status IN ('held', 'confirmed');
