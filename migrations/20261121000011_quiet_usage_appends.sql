-- Usage appends do not NOTIFY.
--
-- A transaction that notifies takes a global lock in its pre-commit step and
-- holds it until its commit has reached the disk (so notifications arrive
-- in commit order): every notifying commit waits for the previous one's
-- flush, and concurrent appends can never share one. Usage is the
-- high-volume path, so its append marks itself (the transaction-local
-- setting `ledger.quiet_append`) and the trigger stays quiet; the process
-- that appended wakes its own projection runner, and runners elsewhere poll.
-- Everything else (catalog, invoices, seals: low volume) still notifies.
CREATE OR REPLACE FUNCTION events_notify_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('ledger.quiet_append', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_notify('ledger_events_appended', '');
    END IF;
    RETURN NULL;
END
$$;
