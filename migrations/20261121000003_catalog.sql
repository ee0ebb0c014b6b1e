-- Service API keys (projection `service_directory`). Only the SHA-256 digest
-- of a key is ever stored; requests are authenticated by looking up the
-- digest of the key they present.
CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY,
    service_code text        NOT NULL REFERENCES service_directory (code),
    key_sha256   text        NOT NULL UNIQUE,
    label        text,
    issued_at    timestamptz NOT NULL,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_service ON api_keys (service_code);

-- Projection `catalog`: each service's metrics, taxes, plans, customers and
-- subscriptions. Every table is keyed by the owning service first, so every
-- lookup is scoped to the calling service. `resource` is the object the
-- Lago-compatible API returns, kept current by the fold.
CREATE TABLE billable_metrics (
    service_code text        NOT NULL,
    code         text        NOT NULL,
    lago_id      uuid        NOT NULL,
    resource     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (service_code, code),
    UNIQUE (service_code, lago_id)
);

CREATE TABLE taxes (
    service_code text        NOT NULL,
    code         text        NOT NULL,
    lago_id      uuid        NOT NULL,
    rate         numeric     NOT NULL,
    resource     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (service_code, code)
);

-- The current version of each plan.
CREATE TABLE plans (
    service_code text        NOT NULL,
    code         text        NOT NULL,
    lago_id      uuid        NOT NULL,
    version      integer     NOT NULL,
    resource     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (service_code, code)
);

-- Every version of every plan, as published (what subscriptions bill on).
CREATE TABLE plan_versions (
    service_code text        NOT NULL,
    code         text        NOT NULL,
    version      integer     NOT NULL,
    definition   jsonb       NOT NULL,
    published_at timestamptz NOT NULL,
    PRIMARY KEY (service_code, code, version)
);

CREATE TABLE customers (
    service_code     text        NOT NULL,
    external_id      text        NOT NULL,
    lago_id          uuid        NOT NULL,
    -- lower(trim(email)): customers are matched by email regardless of case.
    email_normalized text,
    resource         jsonb       NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (service_code, external_id),
    UNIQUE (service_code, lago_id)
);
CREATE INDEX customers_email ON customers (service_code, email_normalized);

CREATE TABLE subscriptions (
    service_code         text        NOT NULL,
    external_id          text        NOT NULL,
    lago_id              uuid        NOT NULL,
    external_customer_id text        NOT NULL,
    plan_code            text        NOT NULL,
    plan_version         integer     NOT NULL,
    shadow               boolean     NOT NULL,
    subscription_at      timestamptz NOT NULL,
    suspended_at         timestamptz,
    terminated_at        timestamptz,
    resource             jsonb       NOT NULL,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    PRIMARY KEY (service_code, external_id),
    UNIQUE (service_code, lago_id)
);
CREATE INDEX subscriptions_customer ON subscriptions (service_code, external_customer_id);

-- The one rule for a subscription's status at a moment: terminated and
-- suspended are recorded facts; pending vs active follows from the start.
CREATE FUNCTION subscription_status(
    subscription_at timestamptz,
    suspended_at timestamptz,
    terminated_at timestamptz,
    at timestamptz
) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN terminated_at IS NOT NULL AND terminated_at <= at THEN 'terminated'
        WHEN suspended_at IS NOT NULL THEN 'suspended'
        WHEN subscription_at > at THEN 'pending'
        ELSE 'active'
    END
$$;
