-- `usage_events` keeps only what aggregation and lookups need; the event
-- itself (properties, ids, recorded time) stays in the log, reached by
-- `position`. Transaction ids are looked up per subscription, so the key
-- leads with (subscription, transaction id).
DROP INDEX usage_events_by_transaction;
ALTER TABLE usage_events
    DROP COLUMN service_code,
    DROP COLUMN external_subscription_id,
    DROP COLUMN lago_id,
    DROP COLUMN customer_lago_id,
    DROP COLUMN unique_key,
    DROP COLUMN properties,
    DROP COLUMN period_end,
    DROP COLUMN recorded_at;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_pkey;
ALTER TABLE usage_events ADD PRIMARY KEY (subscription_lago_id, transaction_id, metric_code);
