ALTER TABLE purchases DROP COLUMN hold_kept_since;
