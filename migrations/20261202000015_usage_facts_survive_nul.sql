-- A usage payload holding an escaped NUL (`\u0000`, accepted by versions
-- without the check at the door) cannot be cast to jsonb, and the cast
-- failed `ledger verify` for the whole log. Such a payload is read with the
-- escape replaced by U+FFFD: the NUL can only be in a property billing does
-- not read (a NUL in an identifier or a distinct key never reached the log:
-- its text column refuses it), so the facts are the same. Payloads without
-- one — all others — are cast as before; the function stays inlinable.
CREATE OR REPLACE FUNCTION usage_facts(aggregate_type text, payload json)
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
    FROM (SELECT CASE WHEN strpos(payload::text, '\u0000') = 0 THEN payload::jsonb
                      ELSE replace(payload::text, '\u0000', '\ufffd')::jsonb END -> 'UsageRecorded' AS r
          WHERE aggregate_type = 'Usage' OFFSET 0) AS usage
$$;
