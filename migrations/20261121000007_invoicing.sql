-- Invoicing.
--
-- `usage_events` gains what billing "as of a log position" needs: the
-- writing transaction of each event (with `position`, its place in the log
-- order) and the unique_count key; windows are read by business timestamp.
-- Existing rows predate those columns, so the projection is rebuilt.
ALTER TABLE usage_events
    ADD COLUMN log_transaction_id bigint NOT NULL DEFAULT 0,
    ADD COLUMN unique_key text;
CREATE INDEX usage_events_by_time ON usage_events (subscription_lago_id, "timestamp");
TRUNCATE usage_events, usage_aggregates, usage_unique_values;
DELETE FROM projection_checkpoints WHERE projection = 'usage';

-- Each subscription's plan versions over time ([{since, code, version}]),
-- kept by the `catalog` projection (rebuilt to fill it in).
ALTER TABLE subscriptions ADD COLUMN plan_history jsonb NOT NULL DEFAULT '[]';
TRUNCATE billable_metrics, taxes, plans, plan_versions, customers, subscriptions;
DELETE FROM projection_checkpoints WHERE projection = 'catalog';

-- Write model of invoicing. Both tables change only in the transaction
-- that appends the invoice events they describe, under the row lock of the
-- service's sequence, so they always agree with the log (and can be derived
-- from it): the last invoice number per service (live and shadow counted
-- apart: numbers are gapless), and how far each billed usage window has been
-- billed (the log position its last invoice or adjustment read usage as of).
CREATE TABLE invoice_sequences (
    service_code text    NOT NULL,
    shadow       boolean NOT NULL,
    last_number  bigint  NOT NULL,
    PRIMARY KEY (service_code, shadow)
);

CREATE TABLE billed_windows (
    subscription_lago_id uuid        NOT NULL,
    window_start         timestamptz NOT NULL,
    window_end           timestamptz NOT NULL,
    plan_code            text        NOT NULL,
    plan_version         integer     NOT NULL,
    as_of_transaction_id bigint      NOT NULL,
    as_of_position       bigint      NOT NULL,
    PRIMARY KEY (subscription_lago_id, window_start)
);

-- Projection `invoices`: every invoice, draft or finalized.
CREATE TABLE invoices (
    service_code             text        NOT NULL,
    lago_id                  uuid        NOT NULL,
    stream_id                text        NOT NULL UNIQUE,
    subscription_lago_id     uuid        NOT NULL,
    external_subscription_id text        NOT NULL,
    external_customer_id     text        NOT NULL,
    issued_at                timestamptz NOT NULL,
    issuing_date             date        NOT NULL,
    status                   text        NOT NULL,
    shadow                   boolean     NOT NULL,
    number                   text,
    sequential_number        bigint,
    grace_until              timestamptz NOT NULL,
    header                   jsonb       NOT NULL,
    finalization             jsonb,
    created_at               timestamptz NOT NULL,
    updated_at               timestamptz NOT NULL,
    PRIMARY KEY (service_code, lago_id)
);
CREATE INDEX invoices_by_customer ON invoices (service_code, external_customer_id, issued_at);
CREATE INDEX invoices_by_subscription ON invoices (subscription_lago_id, issued_at);
CREATE INDEX invoices_drafts ON invoices (grace_until) WHERE status = 'draft';
