-- Projection `service_directory`: the services registered with the ledger,
-- folded from the Service aggregate's events. Rebuildable from the log.
CREATE TABLE service_directory (
    code          text        PRIMARY KEY,
    name          text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('active', 'inactive')),
    registered_at timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    -- The log position of the last event folded into this row.
    last_position bigint      NOT NULL
);
