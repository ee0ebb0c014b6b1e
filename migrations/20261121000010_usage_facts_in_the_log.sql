-- Usage is read from the log itself.
--
-- A usage event's row in `events` carries, beside its payload, the facts
-- billing reads (subscription, metric, business timestamp, value, distinct
-- key, billing period), written by the same multi-row insert that appends
-- it, and one partial index finds a subscription's usage by time. The
-- `usage_events` copy the `usage` projection kept (a second write of every
-- event, and most of a rebuild's cost) is gone: invoices, current usage,
-- explanations and replays read the log's rows as of a log position, and the
-- `usage` projection keeps only the per-period aggregates.
--
-- The columns are not part of the hash chain (the hash covers the payload);
-- `ledger verify` checks that they say what the payload says, using the one
-- definition below.

ALTER TABLE events
    ADD COLUMN usage_subscription uuid,
    ADD COLUMN usage_metric       text,
    ADD COLUMN usage_timestamp    timestamptz,
    ADD COLUMN usage_value        numeric,
    ADD COLUMN usage_unique_key   text,
    ADD COLUMN usage_period_start timestamptz,
    ADD COLUMN usage_period_end   timestamptz;

-- What a log row's usage columns must hold, read from its payload (no row
-- for events other than usage). A set-returning SQL function, so the planner
-- inlines it into a scan; the payload is parsed once per row.
CREATE FUNCTION usage_facts(aggregate_type text, payload json)
RETURNS TABLE (
    subscription uuid,
    metric text,
    "timestamp" timestamptz,
    value numeric,
    unique_key text,
    period_start timestamptz,
    period_end timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT (r->>'subscription_lago_id')::uuid, coalesce(r->'sent'->>'code', ''),
           (r->>'timestamp')::timestamptz, (r->>'value')::numeric, r->>'unique_key',
           (r->'period'->>'start')::timestamptz, (r->'period'->>'end')::timestamptz
    FROM (SELECT payload::jsonb -> 'UsageRecorded' AS r WHERE aggregate_type = 'Usage' OFFSET 0) AS usage
$$;

-- Usage recorded before this migration gets its columns now.
ALTER TABLE events DISABLE TRIGGER events_append_only;
UPDATE events e
SET (usage_subscription, usage_metric, usage_timestamp, usage_value, usage_unique_key,
     usage_period_start, usage_period_end) = (SELECT * FROM usage_facts(e.aggregate_type, e.payload))
WHERE aggregate_type = 'Usage';
ALTER TABLE events ENABLE TRIGGER events_append_only;

-- A subscription's usage by time, covering what billing reads, so a window
-- is read from the index alone (an index-only scan) rather than from a page
-- of the log per event: usage arrives interleaved across subscriptions.
CREATE INDEX events_usage_by_time ON events (usage_subscription, usage_timestamp)
    INCLUDE (usage_metric, usage_value, usage_unique_key, transaction_id, position)
    WHERE usage_subscription IS NOT NULL;

-- Index-only scans need the visibility map, which vacuum sets. The log is
-- insert-only, so vacuuming it is cheap (pages already all-visible are
-- skipped); vacuum it after every 1% of new rows instead of PostgreSQL's 20%.
ALTER TABLE events SET (autovacuum_vacuum_insert_scale_factor = 0.01,
                        autovacuum_vacuum_insert_threshold = 10000);

DROP TABLE usage_events;
