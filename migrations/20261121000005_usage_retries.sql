-- A usage event appended again under the same (subscription, metric,
-- transaction id) key is a retry when what the client sent is the same
-- (compared as JSON values: key order and number spelling do not matter),
-- and a conflict otherwise. Used in the WHERE of the append's
-- ON CONFLICT DO UPDATE: a retry returns true (so nothing is updated and
-- the row is skipped); a conflict raises, which aborts the whole statement,
-- so a batch holding one conflicting event appends nothing. ON CONFLICT
-- waits for a concurrent append of the same key, so this holds under races.
CREATE FUNCTION usage_retry_matches(recorded json, retried json) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF (recorded -> 'UsageRecorded' -> 'sent')::jsonb
       IS DISTINCT FROM (retried -> 'UsageRecorded' -> 'sent')::jsonb THEN
        RAISE EXCEPTION 'usage event already recorded with other content'
            USING ERRCODE = 'LU409';
    END IF;
    RETURN true;
END
$$;
