-- The event log: every fact the ledger knows, appended once, never changed.
--
-- The first seven columns are exactly the table postgres-es writes to, so
-- cqrs-es loads and commits aggregates through it with optimistic
-- concurrency (the primary key rejects a second event at the same sequence).
-- The remaining columns have defaults, so postgres-es never names them.
CREATE TABLE events (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL CHECK (sequence >= 0),
    event_type     text   NOT NULL,
    event_version  text   NOT NULL,
    payload        json   NOT NULL,
    metadata       json   NOT NULL,
    -- Global position: unique and increasing in the order rows were inserted.
    -- Not in commit order: a transaction that inserts position 7 may commit
    -- before the one holding 6. Readers therefore never page on it alone.
    position       bigint GENERATED ALWAYS AS IDENTITY,
    -- The writing transaction. Readers only read rows whose transaction is
    -- older than every transaction still running (the visibility horizon,
    -- pg_snapshot_xmin), and order by (transaction_id, position): a row
    -- that becomes visible later always sorts after everything already read.
    transaction_id xid8   NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence),
    CONSTRAINT events_position_key UNIQUE (position)
);

-- The log order every projection and replay reads in.
CREATE INDEX events_log_order ON events (transaction_id, position);

-- History cannot be rewritten by any bug in the application: the database
-- refuses UPDATE, DELETE and TRUNCATE on the log.
CREATE FUNCTION events_refuse_rewrite() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_rewrite();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_rewrite();

-- Wake projection runners when new events commit (NOTIFY is delivered at
-- commit, once per transaction). Runners also poll, so a lost notification
-- only delays them.
CREATE FUNCTION events_notify_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ledger_events_appended', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify_appended();

-- Aggregate snapshots, as postgres-es expects them (used only if snapshotting
-- is turned on for an aggregate; a cache, not a fact).
CREATE TABLE snapshots (
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          json   NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Where each projection has read the log up to. A projection writes its
-- tables and this row in one transaction, so it never applies an event twice
-- nor skips one; runners lock the row (SKIP LOCKED) so two ledger processes
-- never apply the same event to the same projection.
CREATE TABLE projection_checkpoints (
    projection          text        PRIMARY KEY,
    last_transaction_id xid8        NOT NULL DEFAULT '0',
    last_position       bigint      NOT NULL DEFAULT 0,
    events_applied      bigint      NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
