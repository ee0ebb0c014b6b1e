-- Payments in and webhooks out (docs/webhooks.md).

-- Projection `invoices`: each invoice's payment state.
ALTER TABLE invoices
    ADD COLUMN payment_status  text    NOT NULL DEFAULT 'pending',
    ADD COLUMN payment_overdue boolean NOT NULL DEFAULT false,
    ADD COLUMN payment         jsonb   NOT NULL DEFAULT '{}';
CREATE INDEX invoices_payment_due ON invoices (service_code)
    WHERE status = 'finalized' AND NOT shadow AND payment_status <> 'succeeded' AND NOT payment_overdue;

-- Write side of Stripe's webhook: which invoice each payment intent pays
-- (a charge's refund or dispute names only its payment intent). Written in
-- the transaction that records the Stripe event that revealed it.
CREATE TABLE stripe_payment_intents (
    payment_intent text PRIMARY KEY,
    invoice_stream text NOT NULL
);

-- Projection `webhooks` (the outbox): endpoints, the subscriptions and
-- invoices as their payloads show them, and one message per
-- (webhook-worthy event, matching endpoint), its body the exact bytes sent.
CREATE TABLE webhook_endpoints (
    service_code         text NOT NULL,
    lago_id              uuid PRIMARY KEY,
    webhook_url          text NOT NULL,
    signature_algo       text NOT NULL,
    event_types          jsonb,
    secret               text NOT NULL,
    previous_secret      text,
    previous_valid_until timestamptz,
    disabled_at          timestamptz,
    disabled_reason      text,
    deleted_at           timestamptz,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL
);
CREATE INDEX webhook_endpoints_service ON webhook_endpoints (service_code, created_at);

CREATE TABLE webhook_subscriptions (
    service_code text NOT NULL,
    external_id  text NOT NULL,
    speaks       boolean NOT NULL,
    resource     jsonb NOT NULL,
    PRIMARY KEY (service_code, external_id)
);

CREATE TABLE webhook_invoices (
    stream_id    text PRIMARY KEY,
    status       text NOT NULL,
    header       jsonb NOT NULL,
    finalization jsonb,
    payment      jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL
);

CREATE TABLE webhook_messages (
    id               uuid PRIMARY KEY,
    service_code     text NOT NULL,
    endpoint_lago_id uuid NOT NULL,
    webhook_type     text NOT NULL,
    object_type      text NOT NULL,
    body             text NOT NULL,
    position         bigint NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX webhook_messages_position ON webhook_messages (position);

-- The dispatcher's state (not a projection: a rebuild of `webhooks`
-- recreates the same message ids and never sends one twice). Messages reach
-- it in log order through the cursor; workers claim due deliveries with
-- FOR UPDATE SKIP LOCKED.
CREATE TABLE webhook_dispatch_cursor (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    position bigint NOT NULL
);
INSERT INTO webhook_dispatch_cursor (position) VALUES (0);

CREATE TABLE webhook_deliveries (
    message_id       uuid PRIMARY KEY,
    service_code     text NOT NULL,
    endpoint_lago_id uuid NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    -- attempts made before the current round (a redelivery starts a new
    -- round of the retry schedule)
    round_start      integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    claimed_until    timestamptz,
    enqueued_at      timestamptz NOT NULL,
    delivered_at     timestamptz,
    last_error       text,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_lago_id, status, enqueued_at);

CREATE TABLE webhook_attempts (
    message_id       uuid NOT NULL,
    attempt          integer NOT NULL,
    attempted_at     timestamptz NOT NULL,
    status_code      integer,
    latency_ms       integer NOT NULL,
    error            text,
    response_excerpt text,
    PRIMARY KEY (message_id, attempt)
);
