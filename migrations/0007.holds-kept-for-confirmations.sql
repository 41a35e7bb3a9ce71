-- depends: 0006.partition-progress
-- A held purchase whose confirmation (answered 202 before the hold's end) left its queue without
-- being applied, or may yet: dead-lettered, or delivered again after a worker died holding it. Its
-- hold does not expire on the clock; the confirmation, once applied (replay-dead-letters),
-- confirms it, and a cancellation still cancels it (README, "The box-office lifecycle").
ALTER TABLE purchases
    ADD COLUMN hold_kept_since timestamptz CHECK (isfinite(hold_kept_since));
