ALTER TABLE purchases DROP CONSTRAINT purchases_instants_finite;
ALTER TABLE events DROP CONSTRAINT events_instants_finite;
