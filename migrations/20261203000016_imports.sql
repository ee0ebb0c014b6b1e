-- Imports (docs/imports.md).
--
-- An imported subscription remembers the run that created it; the period
-- closer leaves it alone until a run of the same source, started no earlier,
-- has completed (its whole history — usage included — is then in the log,
-- and folded: `import_runs` belongs to the usage projection, so a completed
-- run there means every usage event before its completion is folded too).
ALTER TABLE subscriptions ADD COLUMN import_source text;
ALTER TABLE subscriptions ADD COLUMN import_run uuid;

-- Projection `usage`: every import run, from the log.
CREATE TABLE import_runs (
    run_id           uuid        PRIMARY KEY,
    service_code     text        NOT NULL,
    source           text        NOT NULL,
    started_position bigint      NOT NULL,
    started_at       timestamptz NOT NULL,
    started_by       text        NOT NULL,
    options          jsonb       NOT NULL,
    completed_at     timestamptz,
    counts           jsonb
);
CREATE INDEX import_runs_by_source ON import_runs (service_code, source, started_position);

-- Projection `imports`: each imported record as it now stands (usage
-- records excepted: they are usage events), for review and reconciliation.
CREATE TABLE imported_records (
    service_code  text        NOT NULL,
    source        text        NOT NULL,
    record_type   text        NOT NULL,
    source_id     text        NOT NULL,
    record        jsonb       NOT NULL,
    imported_by   uuid        NOT NULL,
    changed_by    uuid,
    imported_at   timestamptz NOT NULL,
    changed_at    timestamptz,
    PRIMARY KEY (service_code, source, record_type, source_id)
);
CREATE INDEX imported_external_invoices ON imported_records (service_code, (record->>'external_subscription_id'))
    WHERE record_type = 'external_invoice';
