-- Dual-run reconciliation and the flip (docs/reconciliation.md).

-- Projection `catalog`: the boundary a flipped shadow subscription is live
-- from (invoices issued after it are live).
ALTER TABLE subscriptions ADD COLUMN live_from timestamptz;

-- Projection `reconciliation`: each customer's time zone (a ledger
-- invoice's period is the month its usage window starts in, there).
CREATE TABLE reconciliation_timezones (
    service_code         text NOT NULL,
    external_customer_id text NOT NULL,
    timezone             text NOT NULL,
    PRIMARY KEY (service_code, external_customer_id)
);

-- Both sides' invoices, one row each: the ledger's (side 'ledger', key its
-- stream id; counted once finalized) and the source's imported external
-- invoices (side 'source', key {source}/{source_id}; counted unless draft or
-- void). An invoice with no subscription is unattributed.
CREATE TABLE reconciliation_invoices (
    service_code             text    NOT NULL,
    side                     text    NOT NULL CHECK (side IN ('ledger', 'source')),
    key                      text    NOT NULL,
    external_customer_id     text    NOT NULL,
    external_subscription_id text,
    period                   text,
    counted                  boolean NOT NULL,
    invoice                  jsonb   NOT NULL,
    PRIMARY KEY (service_code, side, key)
);
CREATE INDEX reconciliation_invoices_by_row
    ON reconciliation_invoices (service_code, external_subscription_id, period);
CREATE INDEX reconciliation_unattributed
    ON reconciliation_invoices (period, service_code) WHERE external_subscription_id IS NULL;

-- One row per (service, external subscription id, period): both sides, the
-- delta and the status at a tolerance of 0 (a reader's tolerance and the
-- causes are applied when read).
CREATE TABLE reconciliation_rows (
    service_code             text   NOT NULL,
    external_subscription_id text   NOT NULL,
    period                   text   NOT NULL,
    external_customer_id     text   NOT NULL,
    status                   text   NOT NULL,
    ledger_fees_cents        bigint NOT NULL,
    ledger_taxes_cents       bigint NOT NULL,
    ledger_total_cents       bigint NOT NULL,
    source_fees_cents        bigint NOT NULL,
    source_taxes_cents       bigint NOT NULL,
    source_total_cents       bigint NOT NULL,
    delta_cents              bigint NOT NULL,
    ledger                   jsonb  NOT NULL,
    source                   jsonb  NOT NULL,
    PRIMARY KEY (service_code, external_subscription_id, period)
);
CREATE INDEX reconciliation_rows_by_period ON reconciliation_rows (period, service_code);

-- Operators' acceptances of a row's delta (events `ReconciliationAccepted`):
-- an acceptance covers the delta it was given for; a different delta later
-- is not accepted.
CREATE TABLE reconciliation_acceptances (
    service_code             text        NOT NULL,
    external_subscription_id text        NOT NULL,
    period                   text        NOT NULL,
    delta_cents              bigint      NOT NULL,
    status                   text        NOT NULL,
    reason                   text        NOT NULL,
    accepted_by              text        NOT NULL,
    accepted_at              timestamptz NOT NULL,
    PRIMARY KEY (service_code, external_subscription_id, period)
);
