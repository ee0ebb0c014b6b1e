-- `usage_events` is read by subscription and time (invoice windows, current
-- usage, replay); the per-period index only cost writes.
DROP INDEX usage_events_by_period;
