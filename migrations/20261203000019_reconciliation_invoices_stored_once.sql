-- Projection `reconciliation`: each invoice is stored once, as the JSON text
-- the projection wrote (a row reads its invoices from
-- reconciliation_invoices); rebuilding wrote each invoice three times, and
-- the conversions to jsonb were most of the rebuild's time. Cast `invoice`
-- to jsonb to query inside it.
ALTER TABLE reconciliation_invoices ALTER COLUMN invoice TYPE text USING invoice::text;
ALTER TABLE reconciliation_rows DROP COLUMN ledger, DROP COLUMN source;
