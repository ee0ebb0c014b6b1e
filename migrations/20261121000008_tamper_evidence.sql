-- Tamper evidence, part 1: every event carries a SHA-256 hash chained to the
-- previous event of its stream. The database computes it on insert, so no
-- writer can forget it and no writer waits for another (a stream's previous
-- event is one primary-key lookup; usage streams have none).
--
-- Part 2, the seals over the global log order, are `LogSealed` events written
-- by `ledger serve` and `ledger seal` (see src/audit.rs); `ledger verify`
-- checks both.

-- The one definition of an event's hash: the previous hash of its stream
-- (empty for the first), then every recorded field as stored, separated by
-- the unit separator.
CREATE FUNCTION event_digest(
    previous bytea,
    aggregate_type text,
    aggregate_id text,
    sequence bigint,
    event_type text,
    event_version text,
    payload json,
    metadata json
) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
    SELECT sha256(convert_to(concat_ws(E'\x1f',
        encode(coalesce(previous, ''::bytea), 'hex'), aggregate_type, aggregate_id,
        sequence::text, event_type, event_version, payload::text, metadata::text), 'UTF8'))
$$;

ALTER TABLE events ADD COLUMN event_hash bytea;

CREATE FUNCTION events_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    IF NEW.sequence > 1 THEN
        SELECT e.event_hash INTO previous FROM events e
        WHERE e.aggregate_type = NEW.aggregate_type AND e.aggregate_id = NEW.aggregate_id
          AND e.sequence = NEW.sequence - 1;
    END IF;
    NEW.event_hash := event_digest(previous, NEW.aggregate_type, NEW.aggregate_id, NEW.sequence,
        NEW.event_type, NEW.event_version, NEW.payload, NEW.metadata);
    RETURN NEW;
END
$$;

-- Events recorded before this migration get their chains now (the only time
-- the log is written to other than by appending).
ALTER TABLE events DISABLE TRIGGER events_append_only;
DO $$
DECLARE
    r record;
    previous bytea;
    stream text := NULL;
BEGIN
    FOR r IN SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata
             FROM events ORDER BY aggregate_type, aggregate_id, sequence LOOP
        IF stream IS DISTINCT FROM r.aggregate_type || '/' || r.aggregate_id THEN
            previous := NULL;
            stream := r.aggregate_type || '/' || r.aggregate_id;
        END IF;
        previous := event_digest(previous, r.aggregate_type, r.aggregate_id, r.sequence,
            r.event_type, r.event_version, r.payload, r.metadata);
        UPDATE events SET event_hash = previous
        WHERE aggregate_type = r.aggregate_type AND aggregate_id = r.aggregate_id AND sequence = r.sequence;
    END LOOP;
END
$$;
ALTER TABLE events ENABLE TRIGGER events_append_only;
ALTER TABLE events ALTER COLUMN event_hash SET NOT NULL;

CREATE TRIGGER events_chain
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_chain();
