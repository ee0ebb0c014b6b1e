-- A period's usage that no bill can hold (a sum beyond the decimal type's
-- 7.9 × 10^28) marks its aggregate instead of stopping the projection: the
-- subscription's current usage is then refused with that reason.
ALTER TABLE usage_aggregates ADD COLUMN overflowed boolean NOT NULL DEFAULT false;

-- Subscriptions the period closer could not bill (an invoice's usage or
-- amounts overflow, or its usage window overlaps one already billed): the
-- closer writes the current set on every pass of a service, so an entry
-- disappears once the subscription bills again. Every other subscription
-- is billed as usual.
CREATE TABLE billing_quarantine (
    subscription_lago_id     uuid        PRIMARY KEY,
    service_code             text        NOT NULL,
    external_subscription_id text        NOT NULL,
    -- The issuing instant of the invoice that could not be issued.
    issued_at                timestamptz NOT NULL,
    reason                   text        NOT NULL,
    first_seen_at            timestamptz NOT NULL DEFAULT now(),
    last_seen_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_quarantine_by_service ON billing_quarantine (service_code);
CREATE INDEX usage_aggregates_overflowed ON usage_aggregates (subscription_lago_id) WHERE overflowed;
