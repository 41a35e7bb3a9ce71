-- Events on sale and the purchases the worker has decided.
-- A purchase that has no row yet is pending: the API never writes here, only the worker does.

CREATE TABLE events (
    id                       uuid        PRIMARY KEY,
    name                     text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    description              text,
    venue                    text,
    starts_at                timestamptz NOT NULL,
    total_tickets            integer     NOT NULL CHECK (total_tickets BETWEEN 1 AND 1000000),
    available_tickets        integer     NOT NULL,
    max_tickets_per_purchase integer     NOT NULL DEFAULT 10
                                         CHECK (max_tickets_per_purchase BETWEEN 1 AND 100),
    version                  integer     NOT NULL DEFAULT 1,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_available_within_total CHECK (available_tickets BETWEEN 0 AND total_tickets)
);

-- Keyset pagination walks events in creation order.
CREATE INDEX events_created_at_id_idx ON events (created_at, id);

CREATE TABLE purchases (
    id           uuid        PRIMARY KEY,
    -- No foreign key: a purchase of an unknown (or deleted) event is recorded as rejected,
    -- and a message too broken to read is recorded as failed with whatever could be read.
    event_id     uuid,
    customer_id  text,
    quantity     integer     CHECK (quantity > 0),
    status       text        NOT NULL CHECK (status IN ('confirmed', 'rejected', 'failed')),
    reason       text,
    accepted_at  timestamptz,
    processed_at timestamptz NOT NULL DEFAULT now(),
    partition    integer,
    CONSTRAINT purchases_confirmed_is_complete
        CHECK (status <> 'confirmed' OR (event_id IS NOT NULL AND quantity IS NOT NULL))
);

CREATE INDEX purchases_event_id_idx ON purchases (event_id);
