-- Projection `usage`: every recorded usage event, and per subscription,
-- metric and billing period the running aggregates (count, sum, max,
-- latest, distinct values). Rebuildable from the log; identical after a
-- rebuild because each fold step depends only on the event and the rows.
CREATE TABLE usage_events (
    service_code             text        NOT NULL,
    subscription_lago_id     uuid        NOT NULL,
    external_subscription_id text        NOT NULL,
    metric_code              text        NOT NULL,
    transaction_id           text        NOT NULL,
    lago_id                  uuid        NOT NULL,
    customer_lago_id         uuid        NOT NULL,
    "timestamp"              timestamptz NOT NULL,
    value                    numeric,
    unique_key               text,
    properties               jsonb       NOT NULL,
    period_start             timestamptz NOT NULL,
    period_end               timestamptz NOT NULL,
    position                 bigint      NOT NULL,
    recorded_at              timestamptz NOT NULL,
    PRIMARY KEY (subscription_lago_id, metric_code, transaction_id)
);
CREATE INDEX usage_events_by_transaction ON usage_events (service_code, external_subscription_id, transaction_id);
CREATE INDEX usage_events_by_period ON usage_events (subscription_lago_id, metric_code, period_start, "timestamp");

CREATE TABLE usage_aggregates (
    subscription_lago_id uuid        NOT NULL,
    metric_code          text        NOT NULL,
    period_start         timestamptz NOT NULL,
    period_end           timestamptz NOT NULL,
    events_count         bigint      NOT NULL,
    value_sum            numeric,
    value_max            numeric,
    -- The value of the event with the latest timestamp (ties: latest recorded).
    latest_value         numeric,
    latest_timestamp     timestamptz NOT NULL,
    latest_position      bigint      NOT NULL,
    unique_count         bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (subscription_lago_id, metric_code, period_start)
);

CREATE TABLE usage_unique_values (
    subscription_lago_id uuid        NOT NULL,
    metric_code          text        NOT NULL,
    period_start         timestamptz NOT NULL,
    unique_key           text        NOT NULL,
    PRIMARY KEY (subscription_lago_id, metric_code, period_start, unique_key)
);
