-- The version of each service's usage directory: the catalog rows usage
-- validation depends on (the service's status and API keys, its customers,
-- subscriptions and plans). Any change to one of them gives the service a
-- new version, drawn from one sequence, so a version is never reused. The
-- ingest path remembers a service's directory with the version it was read
-- at, and every append checks in its own statement that the version is
-- still current: one primary-key lookup, whatever the batch names. (It
-- replaces comparing each subscription's and customer's row version, which
-- read every subscription of the service under a generic plan.)
--
-- New rows change nothing remembered (a subscription, customer or key the
-- ingest path has not read cannot be in its memory), so inserts bump only a
-- service's own row; updates, deletes and TRUNCATE (a projection reset) do.
CREATE SEQUENCE usage_directory_version;

CREATE TABLE usage_directory_versions (
    service_code text   PRIMARY KEY,
    version      bigint NOT NULL
);

INSERT INTO usage_directory_versions (service_code, version)
SELECT code, nextval('usage_directory_version') FROM service_directory;

-- TG_ARGV[0]: the column naming the service.
CREATE FUNCTION usage_directory_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE public.usage_directory_versions SET version = nextval('public.usage_directory_version');
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        changed := to_jsonb(NEW);
    ELSE
        changed := to_jsonb(OLD);
    END IF;
    INSERT INTO public.usage_directory_versions AS v (service_code, version)
    VALUES (changed ->> TG_ARGV[0], nextval('public.usage_directory_version'))
    ON CONFLICT (service_code) DO UPDATE SET version = EXCLUDED.version;
    RETURN NULL;
END
$$;

CREATE TRIGGER usage_directory_changed AFTER INSERT OR UPDATE OR DELETE ON service_directory
    FOR EACH ROW EXECUTE FUNCTION usage_directory_changed('code');
CREATE TRIGGER usage_directory_reset AFTER TRUNCATE ON service_directory
    FOR EACH STATEMENT EXECUTE FUNCTION usage_directory_changed();

CREATE TRIGGER usage_directory_changed AFTER UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION usage_directory_changed('service_code');
CREATE TRIGGER usage_directory_reset AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION usage_directory_changed();

CREATE TRIGGER usage_directory_changed AFTER UPDATE OR DELETE ON customers
    FOR EACH ROW EXECUTE FUNCTION usage_directory_changed('service_code');
CREATE TRIGGER usage_directory_reset AFTER TRUNCATE ON customers
    FOR EACH STATEMENT EXECUTE FUNCTION usage_directory_changed();

CREATE TRIGGER usage_directory_changed AFTER UPDATE OR DELETE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION usage_directory_changed('service_code');
CREATE TRIGGER usage_directory_reset AFTER TRUNCATE ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION usage_directory_changed();

CREATE TRIGGER usage_directory_changed AFTER UPDATE OR DELETE ON plans
    FOR EACH ROW EXECUTE FUNCTION usage_directory_changed('service_code');
CREATE TRIGGER usage_directory_reset AFTER TRUNCATE ON plans
    FOR EACH STATEMENT EXECUTE FUNCTION usage_directory_changed();
