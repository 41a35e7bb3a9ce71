DROP INDEX purchases_holdings;
DROP INDEX purchases_held_by_partition;
ALTER TABLE purchases
    DROP CONSTRAINT purchases_lifecycle_finite,
    DROP CONSTRAINT purchases_held_until,
    DROP COLUMN payment_reference,
    DROP COLUMN cancelled_at,
    DROP COLUMN confirmed_at,
    DROP COLUMN hold_expires_at,
    DROP CONSTRAINT purchases_holding_is_complete,
    ADD CONSTRAINT purchases_confirmed_is_complete
        CHECK (status <> 'confirmed' OR (event_id IS NOT NULL AND quantity IS NOT NULL)),
    DROP CONSTRAINT purchases_status_check,
    ADD CONSTRAINT purchases_status_check CHECK (status IN ('confirmed', 'rejected', 'failed'));
ALTER TABLE events
    DROP CONSTRAINT events_sales_window_finite,
    DROP CONSTRAINT events_sales_window_in_order,
    DROP COLUMN hold_seconds,
    DROP COLUMN max_tickets_per_customer,
    DROP COLUMN sales_end_at,
    DROP COLUMN sales_start_at;
